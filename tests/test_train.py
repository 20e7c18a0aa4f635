"""Trainer pieces: config, schedules, loss, gradient accumulation, sharding, remat, freezing, FLOPs."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.data.pipeline import make_dataset
from flashvl_jax.data.synthetic import SyntheticVQA
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer
from flashvl_jax.sharding import make_mesh, state_shardings
from flashvl_jax.train import flops
from flashvl_jax.train.config import ModelConfig, load_train_config
from flashvl_jax.train.losses import cross_entropy_sum, select_targets
from flashvl_jax.train.optimizer import make_optimizer, make_schedule, path_name
from flashvl_jax.models.layers import set_remat
from flashvl_jax.train.state import create_train_state
from flashvl_jax.train.steps import make_train_step, sft_objective, to_global
from flashvl_jax.train.trainer import build_model


VOCAB = 1024  # the machinery tests need no real vocabulary: token ids are folded into 1024 rows


@pytest.fixture(scope="module")
def tiny():
  tiny = load_train_config("tiny")
  return load_train_config("tiny", [f"model.overrides=[{','.join(tiny.model.overrides)},llm.vocab_size={VOCAB}]"])


@pytest.fixture(scope="module")
def batches(tiny):
  """Three real batches of 8 from the synthetic pipeline, ids folded into the small vocabulary."""
  processor = Processor(tiny.model.flashvl_config(), load_tokenizer("qwen2.5"), max_length=tiny.data.max_length)
  ds = make_dataset(SyntheticVQA(64, "train", tiny.data.synthetic), processor, batch_size=8, shuffle=False,
                    num_threads=0)
  batches = list(itertools.islice(iter(ds), 3))
  for batch in batches:
    batch["input_ids"] = np.where(batch["input_ids"] >= 0, batch["input_ids"] % VOCAB, batch["input_ids"])
  return batches


@pytest.fixture(scope="module")
def initial_model(tiny):
  """(graphdef, state) of the tiny model, built once; `fresh_model` copies it onto any mesh."""
  return nnx.split(build_model(tiny.model, one_device_mesh()))


def fresh_model(initial_model, mesh, remat="none"):
  graphdef, state = initial_model
  copy = jax.tree.map(jnp.copy, state)  # the steps donate their state; device_put alone may alias
  model = nnx.merge(graphdef, jax.device_put(copy, state_shardings(state, mesh)))
  set_remat(model, remat)
  return model


@pytest.fixture(scope="module")
def uneven_batches(batches):
  """The batches with 3, 6 and 9 extra target tokens in rows 0, 1 and 2: token counts differ per micro-batch."""
  uneven = []
  for batch in batches:
    batch = {k: v.copy() for k, v in batch.items()}
    lengths = batch["attention_mask"].sum(1)
    for row in range(3):
      batch["loss_mask"][row, lengths[row] - 3 * (row + 2):lengths[row] - 3] = 1
    uneven.append(batch)
  return uneven


SGD = optax.sgd(0.1, momentum=0.5)  # updates linear in the gradients, so exact comparisons stay meaningful


def one_device_mesh():
  return make_mesh({"fsdp": 1}, devices=jax.devices()[:1])


def leaves(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def run_steps(model, cfg, mesh, batches, tx, *, grad_accum_steps=1, max_targets=None, frozen_dtype="float32"):
  """(parameters before and after each step, per-step metrics, final state): one step per batch."""
  with jax.set_mesh(mesh):
    graphdef, state, shardings = create_train_state(model, cfg.optimizer.trainable, tx, mesh,
                                                    frozen_dtype=frozen_dtype)
    step = make_train_step(graphdef, tx, optax.constant_schedule(0.0), shardings, mesh, sft_objective(max_targets),
                           grad_accum_steps=grad_accum_steps)
    params, metrics = [leaves(state.params)], []
    for batch in batches:
      state, m = step(state, to_global(batch, mesh))
      params.append(leaves(state.params))
      metrics.append(jax.device_get(m))
  return params, metrics, state


@pytest.fixture(scope="module")
def reference(tiny, initial_model, uneven_batches):
  """Three one-device SGD steps on the uneven batches without accumulation: what the others must equal."""
  mesh = one_device_mesh()
  return run_steps(fresh_model(initial_model, mesh), tiny, mesh, uneven_batches, SGD)


def assert_same_steps(params, metrics, reference, steps=3):
  ref_params, ref_metrics, _ = reference
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in metrics[:steps]], [m[key] for m in ref_metrics[:steps]], rtol=1e-5)
  for after, ref_after in zip(params[1:steps + 1], ref_params[1:steps + 1]):
    for a, b in zip(after, ref_after, strict=True):  # rtol 1e-5 of each element or of the tensor's scale
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_config_rejects_unknown_keys_by_name():
  with pytest.raises(ConfigError, match=r"optimizer\.peak_l.*did you mean 'peak_lr'"):
    load_train_config("tiny", ["optimizer.peak_l=1"])
  with pytest.raises(ConfigError, match=r"unknown config key 'llm\.hiden_size'"):
    load_train_config("tiny", ["model.overrides=[llm.hiden_size=8]"])
  with pytest.raises(ConfigError, match=r"data.path \(the data file\(s\)\) is required when data.source is .json."):
    load_train_config("stage2_full")


def test_stage_configs_follow_table_1():
  """Stage 1 trains only the adapter with cosine 1e-3 -> 2e-5 after warmup; stages 2-4 train all, 1e-5 -> 0."""
  stage1 = load_train_config("stage1_adapter", ["data.path=d.jsonl"])
  assert stage1.optimizer.trainable == (r"^adp\.",)
  sched = make_schedule(stage1.optimizer, 10_000)
  warm = stage1.optimizer.warmup_steps
  assert float(sched(0)) == 0.0 and float(sched(warm // 2)) == pytest.approx(5e-4)
  assert float(sched(warm)) == pytest.approx(1e-3) and float(sched(10_000)) == pytest.approx(2e-5)
  for name in ("stage2_full", "stage3_full", "stage4_full"):
    cfg = load_train_config(name, ["data.path=d.jsonl"])
    sched = make_schedule(cfg.optimizer, 1000)
    assert cfg.optimizer.trainable == (".*",)
    assert float(sched(0)) == pytest.approx(1e-5) and float(sched(500)) == pytest.approx(5e-6)
    assert float(sched(1000)) == 0.0


def test_loss_is_token_mean_over_next_answer_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 7, 11)).astype(np.float32)
  ids = rng.integers(0, 11, size=(2, 7)).astype(np.int32)
  ids[0, 1] = -201  # an image placeholder: never a target here since its mask is 0
  loss_mask = np.array([[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]], np.int32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = [-log_probs[b, t - 1, ids[b, t]] for b in range(2) for t in range(7) if loss_mask[b, t]]
  _, targets, weights = select_targets(jnp.asarray(ids), jnp.asarray(loss_mask))
  total, count = cross_entropy_sum(jnp.asarray(logits), targets, weights)
  assert int(count) == 5
  np.testing.assert_allclose(float(total / count), np.mean(expected), rtol=1e-6)
  positions, targets, weights = select_targets(jnp.asarray(ids), jnp.asarray(loss_mask), max_targets=3)
  np.testing.assert_array_equal(positions[:, :2], [[2, 3], [3, 4]])
  gathered = jnp.take_along_axis(jnp.asarray(logits), positions[..., None], axis=1)
  np.testing.assert_allclose(float(cross_entropy_sum(gathered, targets, weights)[0]), float(total), rtol=1e-6)


def test_grad_accumulation_equals_big_batch(tiny, initial_model, uneven_batches, reference):
  """4 micro-batches with unequal answer-token counts give the big-batch losses and updates."""
  micro_counts = [uneven_batches[0]["loss_mask"][i::4, 1:].sum() for i in range(4)]
  assert len(set(micro_counts)) == 4  # so a mean of micro-batch means would differ from the token mean
  mesh = one_device_mesh()
  params, metrics, _ = run_steps(fresh_model(initial_model, mesh), tiny, mesh, uneven_batches, SGD,
                                 grad_accum_steps=4)
  assert_same_steps(params, metrics, reference)


def test_sharded_steps_equal_unsharded(tiny, initial_model, uneven_batches, reference):
  """Three steps on a 2x2x2 (data, fsdp, tensor) mesh, in 2 micro-batches, equal the one-device steps."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params, metrics, state = run_steps(fresh_model(initial_model, mesh), tiny, mesh, uneven_batches, SGD,
                                     grad_accum_steps=2)
  specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
  momentum_specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert momentum_specs == specs  # the optimizer state is sharded like the parameters
  assert_same_steps(params, metrics, reference)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_matches_no_remat(tiny, initial_model, uneven_batches, reference, remat):
  mesh = one_device_mesh()
  params, metrics, _ = run_steps(fresh_model(initial_model, mesh, remat=remat), tiny, mesh, uneven_batches[:1], SGD)
  assert_same_steps(params, metrics, reference, steps=1)


def test_remat_is_applied_inside_the_scanned_layers(tiny, initial_model):
  """A remat policy set on the model shows in the traced train-step body (a checkpoint inside the layer scan); an
  unknown policy name is refused naming the choices."""
  graphdef, state = initial_model
  model = nnx.merge(graphdef, state)
  forward = lambda m, ids: m.llm(ids)
  ids = jnp.zeros((1, 8), jnp.int32)
  assert "checkpoint" not in str(jax.make_jaxpr(forward)(model, ids))
  set_remat(model, "full")
  jaxpr = jax.make_jaxpr(forward)(model, ids)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and "nothing_saveable" in str(scans[0].params["jaxpr"])  # `full` = nothing saved
  with pytest.raises(ValueError, match="unknown remat policy 'some'.*dots_saveable"):
    set_remat(model, "some")


def test_frozen_parameters_get_no_state_and_stay_bit_identical(tiny, initial_model, batches):
  cfg = dataclasses.replace(tiny, optimizer=dataclasses.replace(tiny.optimizer, trainable=(r"^adp\.",)))
  tx = make_optimizer(cfg.optimizer, make_schedule(cfg.optimizer, 10))
  initial_frozen = leaves(nnx.state(nnx.merge(*initial_model), nnx.Not(nnx.PathContains("adp"))))
  mesh = one_device_mesh()
  params, _, state = run_steps(fresh_model(initial_model, mesh), cfg, mesh, batches[:2], tx)
  names = [path_name(p) for p, _ in nnx.to_flat_state(state.params)]
  assert names and all(n.startswith("adp.") for n in names)
  for before, after in zip(initial_frozen, leaves(state.frozen), strict=True):
    np.testing.assert_array_equal(before, after)
  assert all(not np.array_equal(a, b) for a, b in zip(params[0], params[-1]))
  adapter_size = sum(x.size for x in params[0])
  opt_state = leaves(state.opt_state)
  assert sum(x.size for x in opt_state if x.ndim) == 2 * adapter_size  # Adam mu and nu of the adapter only
  assert all(x.dtype == np.int32 for x in opt_state if not x.ndim)  # and step counters


def test_frozen_parameters_in_bfloat16(tiny, initial_model, batches):
  """`frozen_dtype=bfloat16` (the config default) stores the frozen towers rounded to bf16, never updates them, keeps
  the trainable parameters in fp32, and trains to nearly the same loss as fp32 frozen towers."""
  cfg = dataclasses.replace(tiny, optimizer=dataclasses.replace(tiny.optimizer, trainable=(r"^adp\.",)))
  assert ModelConfig().frozen_dtype == "bfloat16"
  tx = make_optimizer(cfg.optimizer, make_schedule(cfg.optimizer, 10))
  initial_frozen = leaves(nnx.state(nnx.merge(*initial_model), nnx.Not(nnx.PathContains("adp"))))
  mesh = one_device_mesh()
  models = {dtype: fresh_model(initial_model, mesh) for dtype in ("float32", "bfloat16")}
  runs = {dtype: run_steps(model, cfg, mesh, batches[:2], tx, frozen_dtype=dtype) for dtype, model in models.items()}
  params, metrics, state = runs["bfloat16"]
  # cast in the model too (arrays shared with the state, so donated by the step: dtypes only), so no float32 copy
  # of the frozen towers outlives the state's bf16 one
  frozen_in_model = jax.tree.leaves(nnx.state(models["bfloat16"], nnx.Not(nnx.PathContains("adp"))))
  assert {x.dtype for x in frozen_in_model if x.dtype != np.int32} == {jnp.dtype(jnp.bfloat16)}
  floating = [(b, a) for b, a in zip(initial_frozen, leaves(state.frozen), strict=True) if b.dtype == np.float32]
  assert floating and all(a.dtype == jnp.bfloat16 for _, a in floating)
  for before, after in floating:
    np.testing.assert_array_equal(before.astype(jnp.bfloat16), after)
  assert all(x.dtype == np.float32 for x in params[-1])
  fp32_loss, bf16_loss = (float(runs[d][1][-1]["loss"]) for d in ("float32", "bfloat16"))
  assert abs(bf16_loss - fp32_loss) < 0.02 * abs(fp32_loss), (fp32_loss, bf16_loss)


@pytest.mark.parametrize("preset", ["flashvl-2b-static", "flashvl-2b-dynamic"])
def test_analytic_flops_match_xla_count(preset):
  """Per component, the forward FLOPs agree with XLA's count of the full-width model (abstract weights); XLA computes
  the masked half of causal attention too, so it is added for the comparison. One layer per tower: XLA's cost
  analysis counts the body of the layer scan once, whatever its length."""
  cfg = load_config(preset, ["vision.num_hidden_layers=1", "llm.num_hidden_layers=1", "dtype=float32",
                             "param_dtype=float32"])
  graphdef, state = nnx.split(nnx.eval_shape(lambda: FlashVLModel(cfg, rngs=nnx.Rngs(0))))
  count = lambda f, shape, dtype=jnp.float32: jax.jit(lambda state, x: f(nnx.merge(graphdef, state), x)).lower(
      state, jax.ShapeDtypeStruct(shape, dtype)).cost_analysis()["flops"]
  size, tokens, length = cfg.vision.image_size, 256, 512
  vit = count(lambda m, x: m.vit.forward_features(x), (2, size, size, 3))
  adapter = count(lambda m, x: m.adp(x), (1, tokens, 4 * cfg.vision.hidden_size))
  llm = count(lambda m, x: m.llm(x), (1, length), jnp.int32)
  masked_half = cfg.llm.num_hidden_layers * 2 * cfg.llm.num_attention_heads * cfg.llm.head_dim * length**2
  assert 2 * flops.vit_flops_per_tile(cfg) == pytest.approx(vit, rel=0.01)
  assert tokens * flops.adapter_flops_per_token(cfg) == pytest.approx(adapter, rel=0.01)
  assert flops.llm_flops(cfg, length, length**2) + masked_half == pytest.approx(llm, rel=0.01)
  sizes = dict(tiles=1, image_tokens=1, tokens=1, sum_sq_lengths=1)
  forward = flops.train_step_flops(cfg, dict(vit=False, adp=False, llm=False), **sizes)
  parts = [flops.vit_flops_per_tile(cfg), flops.adapter_flops_per_token(cfg), flops.llm_flops(cfg, 1, 1)]
  assert forward == pytest.approx(sum(parts))
  adapter_only = flops.train_step_flops(cfg, dict(vit=False, adp=True, llm=False), **sizes)
  assert adapter_only == pytest.approx(parts[0] + 3 * parts[1] + 2 * parts[2])  # LLM: forward + input grads
