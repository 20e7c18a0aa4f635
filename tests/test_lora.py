"""LoRA: targets, exact identity at init and when switched off, merge + export, dropout, SFT-LoRA, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from PIL import Image

from flashvl_jax import checkpoint
from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer
from flashvl_jax.sharding import logical_to_spec, make_mesh, state_shardings
from flashvl_jax.train import lora
from flashvl_jax.train.config import ADAPTER_TARGETS, LLM_TARGETS, LoraConfig, load_train_config
from flashvl_jax.train.optimizer import path_name
from flashvl_jax.train.state import create_train_state
from flashvl_jax.train.steps import make_train_step, sft_objective, to_global

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def cfg():
  return load_config("tiny-static", ["vision.num_hidden_layers=1", "llm.num_hidden_layers=1"])


@pytest.fixture(scope="module")
def base(cfg):
  """The base model, built once (initialising the 151,936-row embedding takes seconds); tests adapt clones."""
  return FlashVLModel(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch(cfg):
  """Two conversations about two images, with answers (loss_mask) for the SFT step."""
  processor = Processor(cfg, load_tokenizer("qwen2.5"), max_length=48)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
  conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                   for q, a in (("How many squares?", "3"), ("Which colour?", "red"))]
  return processor(images, conversations)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, batch, enabled):
  model = nnx.merge(graphdef, state)
  lora.set_lora(model, enabled=enabled)
  return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
               image_patch_index=batch["image_patch_index"])


def logits(model, batch, enabled=True):
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}, enabled))


def adapted_copy(base, **lora_kw):
  """A clone of `base` with rank-4 adapters whose A and B are random, so that they change the output."""
  model = nnx.clone(base)
  lora.add_lora(model, LoraConfig(rank=4, **lora_kw))
  randomize_adapters(model)
  return model


def randomize_adapters(model, seed=1, scale=0.3):
  key = jax.random.key(seed)
  for i, (_, m) in enumerate(nnx.iter_modules(model)):
    if isinstance(m, lora.LoRA):
      ka, kb = jax.random.split(jax.random.fold_in(key, i))
      m.lora_a[...] = jax.random.normal(ka, m.lora_a.shape) * scale
      m.lora_b[...] = jax.random.normal(kb, m.lora_b.shape) * scale


def lora_b_values(params):
  return {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params) if p[-1] == "lora_b"}


def flat_shapes(model):
  return {path_name(p): (v.shape, v.dtype) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_targets_are_llm_projections_and_adapter_linears(cfg, base):
  model = nnx.clone(base)
  adapted = lora.add_lora(model, LoraConfig(rank=4))
  layers = [f"llm.model.layers.{p}" for p in PROJECTIONS]  # stacked: one path adapts every layer
  assert sorted(adapted) == sorted(["adp.linear_1", "adp.linear_2", "adp.proj"] + layers)
  q = model.llm.model.layers.self_attn.q_proj
  assert isinstance(q.lora, lora.LoRA) and isinstance(q.lora.lora_a, nnx.LoRAParam)
  n = cfg.llm.num_hidden_layers
  assert q.lora.lora_a.shape == (n, cfg.llm.hidden_size, 4) and q.lora.lora_b.shape == (n, 4, q.out_features)
  assert model.adp.linear_1.lora.lora_a.shape == (model.adp.linear_1.in_features, 4)  # not stacked
  with pytest.raises(ConfigError, match=r"regex '.*mlp.*gate' matches no linear layer.*carry no layer index"):
    lora.add_lora(nnx.clone(base), LoraConfig(targets=(r"llm\.model\.layers\.\d+\.mlp\.gate",)))
  with pytest.raises(ConfigError, match="already has a LoRA adapter"):
    lora.add_lora(model, LoraConfig())
  with pytest.raises(ConfigError, match="lora.rank"):
    LoraConfig(rank=0)


def test_fresh_and_switched_off_adapters_equal_the_base_exactly(base, batch):
  expected = logits(base, batch)
  model = nnx.clone(base)
  lora.add_lora(model, LoraConfig(rank=4))
  np.testing.assert_array_equal(logits(model, batch), expected)  # B = 0 at creation
  randomize_adapters(model)
  assert np.abs(logits(model, batch) - expected).max() > 1e-2
  np.testing.assert_array_equal(logits(model, batch, enabled=False), expected)


def test_merged_model_equals_adapted_model_and_exports_to_hf(base, batch, tmp_path):
  from convert.__main__ import main as convert_main

  base_shapes = flat_shapes(base)
  model = adapted_copy(base, alpha=8.0)
  adapted = logits(model, batch)
  merged = lora.merge_lora(model)
  assert not any(isinstance(m, lora.LoRA) for _, m in nnx.iter_modules(merged))
  assert flat_shapes(merged) == base_shapes
  merged_logits = logits(merged, batch)
  assert np.abs(merged_logits - adapted).max() <= 1e-5
  np.testing.assert_array_equal(logits(model, batch), adapted)  # the adapted model is untouched
  checkpoint.save_model(tmp_path / "merged", merged)
  assert convert_main(["export", str(tmp_path / "merged"), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
  reloaded, _ = checkpoint.load_model(tmp_path / "hf")
  np.testing.assert_array_equal(logits(reloaded, batch), merged_logits)


def test_dropout_needs_a_key_and_follows_it(base, batch):
  model = adapted_copy(base, dropout=0.5)
  graphdef, state = nnx.split(model)
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def outputs(state):
    model = nnx.merge(graphdef, state)
    run = lambda: model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                        image_patch_index=inputs["image_patch_index"])
    plain = run()
    keyed = []
    for seed in (0, 0, 1):
      lora.set_lora(model, dropout_key=jax.random.key(seed))
      keyed.append(run())
    lora.set_lora(model)  # back to no dropout
    return plain, *keyed, run()

  plain, a, a_again, b, reset = map(np.asarray, outputs(state))
  np.testing.assert_allclose(plain, logits(model, batch), atol=1e-4)  # no key: no dropout (other compile: ~1e-6 off)
  np.testing.assert_array_equal(reset, plain)
  np.testing.assert_array_equal(a, a_again)
  assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3


def test_sft_lora_step_trains_only_the_adapters(cfg, base, batch):
  """The trainer's SFT step with `optimizer.trainable = [LORA_TRAINABLE]`: optimizer state and updates only there."""
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  model = nnx.clone(base)
  lora.add_lora(model, LoraConfig(rank=4))
  count = lora.lora_param_count(model)
  tx = optax.adam(1e-2)
  with jax.set_mesh(mesh):
    graphdef, state, shardings = create_train_state(model, (lora.LORA_TRAINABLE,), tx, mesh)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * count + 1  # Adam mu, nu and the step count
    frozen = jax.device_get(state.frozen)
    before = lora_b_values(state.params)
    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-2), shardings, mesh, sft_objective())
    state, metrics = step(state, to_global(dict(batch), mesh))
  assert np.isfinite(float(metrics["loss"]))
  for old, new in zip(jax.tree.leaves(frozen), jax.tree.leaves(jax.device_get(state.frozen))):
    np.testing.assert_array_equal(old, new)
  after = lora_b_values(state.params)
  moved = [np.abs(after[name] - before[name]).max() for name in before]
  assert len(moved) == 3 + 7 and min(moved) > 0  # one stacked B per LLM projection; A has no gradient while B = 0


def test_adapters_added_to_a_sharded_model_follow_the_rules(base):
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  graphdef, state = nnx.split(nnx.clone(base))
  model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
  lora.add_lora(model, LoraConfig(rank=8))
  for module in (model.llm.model.layers.self_attn.q_proj, model.llm.model.layers.mlp.down_proj):
    layers_axis, in_axis, out_axis = module.kernel.get_metadata()["out_sharding"]
    for param, axes in ((module.lora.lora_a, (layers_axis, in_axis, None)),
                        (module.lora.lora_b, (layers_axis, None, out_axis))):
      assert param.get_metadata()["out_sharding"] == axes
      assert param.get_value().sharding.spec == logical_to_spec(axes, param.shape, mesh)
  q_b = model.llm.model.layers.self_attn.q_proj.lora.lora_b.get_value()
  assert q_b.sharding.spec == PartitionSpec(None, None, "tensor")


def test_post_training_configs_validate():
  """sft_lora / stage5_dpo / grpo load as TrainConfigs with their objective, adapters on the default targets, only
  the adapters trainable, and the paper's DPO beta and GRPO group size / KL coefficient."""
  configs = {name: load_train_config(name, ["data.path=data.jsonl"]) for name in ("sft_lora", "stage5_dpo", "grpo")}
  assert {name: c.objective for name, c in configs.items()} == {"sft_lora": "sft", "stage5_dpo": "dpo", "grpo": "grpo"}
  for c in configs.values():
    assert c.optimizer.trainable == (lora.LORA_TRAINABLE,)
    assert c.lora.targets == (LLM_TARGETS, ADAPTER_TARGETS)
  assert configs["stage5_dpo"].dpo.beta == 0.1
  assert (configs["grpo"].grpo.group_size, configs["grpo"].grpo.kl_coef) == (24, 0.001)
  with pytest.raises(ConfigError, match="needs a lora section"):
    load_train_config("stage5_dpo", ["data.path=data.jsonl", "lora=null"])


@pytest.mark.slow
def test_full_size_adapter_count_and_the_papers_10_73m():
  """Rank 8 on the 7 LLM projections x 28 layers + the 3 adapter linears = 9.50M; adding the (untied) LM head gives
  exactly the paper's 10.73M (Table 1, stage 5). The ViT gets no adapters; it is cut to one layer to trace faster."""
  full = load_config("flashvl-2b-static", ["llm.tie_word_embeddings=false", "vision.num_hidden_layers=1"])
  cfg = LoraConfig(rank=8, targets=(LLM_TARGETS, ADAPTER_TARGETS, r"llm\.lm_head"))
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: lora.with_lora(FlashVLModel(full, rngs=nnx.Rngs(0)), cfg))
  counts = {path_name(p): v.size for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.LoRAParam))}
  d, ffn, kv = full.llm.hidden_size, full.llm.intermediate_size, full.llm.num_key_value_heads * full.llm.head_dim
  q = full.llm.num_attention_heads * full.llm.head_dim
  per_layer = 8 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ffn) + (ffn + d))
  a_in, a_mid = full.vision.hidden_size * 4, full.adapter.intermediate_size
  adapter = 8 * ((a_in + a_mid) + 2 * a_mid + (a_mid + d))
  head = 8 * (d + full.llm.vocab_size)
  default = sum(v for k, v in counts.items() if not k.startswith("llm.lm_head"))
  assert default == full.llm.num_hidden_layers * per_layer + adapter
  assert sum(counts.values()) - default == head
  assert round(sum(counts.values()) / 1e6, 2) == 10.73
