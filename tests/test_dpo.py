"""DPO: the loss and its gradients against NumPy, one batched forward per policy, and a short training run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.data.pipeline import make_dataset
from flashvl_jax.data.synthetic import SyntheticConfig, SyntheticPreferences, SyntheticVQA
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer
from flashvl_jax.sharding import make_mesh
from flashvl_jax.train import dpo, lora
from flashvl_jax.train.config import DPOConfig, LoraConfig
from flashvl_jax.train.state import create_train_state
from flashvl_jax.train.steps import evaluate, make_eval_step, make_train_step, to_global

BETA, SMOOTHING = 0.1, 0.2


@pytest.fixture(scope="module")
def cfg():
  return load_config("tiny-static", ["vision.num_hidden_layers=1", "llm.num_hidden_layers=1"])


@pytest.fixture(scope="module")
def pair_batches(cfg):
  """Two batches of 8 preference pairs, one question type of each kind per 4 (a fixed set seen repeatedly below)."""
  processor = Processor(cfg, load_tokenizer("qwen2.5"), max_length=48)
  source = SyntheticPreferences(SyntheticVQA(16, "train", SyntheticConfig(image_size=64)))
  ds = make_dataset(source, processor, batch_size=8, shuffle=False, num_threads=0, records="preference")
  return list(itertools.islice(iter(ds), 2))


@pytest.fixture(scope="module")
def base(cfg):
  """The base model, built once (initialising the 151,936-row embedding takes seconds); tests adapt clones."""
  return FlashVLModel(cfg, rngs=nnx.Rngs(0))


def lora_model(base, rank=4):
  model = nnx.clone(base)
  lora.add_lora(model, LoraConfig(rank=rank))
  return model


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def numpy_dpo(policy_logits, ref_logits, input_ids, loss_mask, beta, smoothing):
  """(mean loss, d loss / d policy logits) for 2B rows (chosen, then rejected), straight from the definition."""
  rows, steps = np.nonzero(loss_mask[:, 1:])  # the logits at position t score token t + 1
  scored = np.arange(len(rows))
  targets = input_ids[rows, steps + 1]
  policy_lp = log_softmax(policy_logits[rows, steps].astype(np.float64))
  ref_lp = log_softmax(ref_logits[rows, steps].astype(np.float64))
  policy = np.bincount(rows, policy_lp[scored, targets], minlength=len(input_ids))
  ref = np.bincount(rows, ref_lp[scored, targets], minlength=len(input_ids))
  b = len(input_ids) // 2
  margin = beta * ((policy[:b] - ref[:b]) - (policy[b:] - ref[b:]))
  losses = -(1 - smoothing) * np.log(sigmoid(margin)) - smoothing * np.log(sigmoid(-margin))
  d_margin = (-(1 - smoothing) * sigmoid(-margin) + smoothing * sigmoid(margin)) * beta / b
  d_policy = np.concatenate([d_margin, -d_margin])  # d loss / d (summed log-likelihood of each row)
  d_log_prob = -np.exp(policy_lp)
  d_log_prob[scored, targets] += 1  # d log p(target) / d logits = one_hot - softmax
  d_logits = np.zeros(policy_logits.shape, np.float32)
  d_logits[rows, steps] = d_policy[rows, None] * d_log_prob
  return losses.mean(), d_logits


def test_dpo_losses_match_the_formula():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(size=6) * 3 for _ in range(4))
  losses, rewards = dpo.dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr)), BETA, SMOOTHING)
  margin = BETA * ((pc - rc) - (pr - rr))
  expected = -(1 - SMOOTHING) * np.log(sigmoid(margin)) - SMOOTHING * np.log(sigmoid(-margin))
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(rewards["chosen"], BETA * (pc - rc), rtol=1e-5)
  grad = jax.grad(lambda pc: dpo.dpo_losses(pc, pr, rc, rr, BETA, SMOOTHING)[0].sum())(jnp.asarray(pc))
  np.testing.assert_allclose(grad, (-(1 - SMOOTHING) * sigmoid(-margin) + SMOOTHING * sigmoid(margin)) * BETA,
                             rtol=1e-5)


def test_dpo_loss_and_gradients_match_numpy(base, pair_batches):
  """On real pipeline pairs: the step's loss equals NumPy's from the model's logits, and its LoRA gradient equals
  NumPy's d loss / d logits pulled back through the model (policy = LoRA on, reference = LoRA off)."""
  model = lora_model(base)
  key = jax.random.key(3)
  for i, (_, m) in enumerate(nnx.iter_modules(model)):
    if isinstance(m, lora.LoRA):  # a policy that differs from the reference
      m.lora_b[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), m.lora_b.shape)
  graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
  batch = {k: jnp.asarray(v[:2]) for k, v in pair_batches[0].items()}  # 2 pairs: [4, T, V] logits in NumPy
  rows = dpo.concat_pairs(batch)

  def loss(params):
    sums = dpo.dpo_sums(nnx.merge(graphdef, params, frozen), batch, None, beta=BETA, label_smoothing=SMOOTHING)
    return sums["loss"] / sums["pairs"]

  def all_logits(params, enabled=True):
    model = nnx.merge(graphdef, params, frozen)
    lora.set_lora(model, enabled=enabled)
    return model(rows["input_ids"], rows["pixel_values"], rows["attention_mask"],
                 image_patch_index=rows["image_patch_index"])

  @jax.jit
  def logits_and_pull_back(params, cotangent):
    """(policy logits, reference logits, the cotangent on the policy logits pulled back to the parameters)."""
    policy_logits, pull_back = jax.vjp(all_logits, params)
    return policy_logits, all_logits(params, False), pull_back(cotangent)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  zeros = jnp.zeros((len(rows["input_ids"]), rows["input_ids"].shape[1], base.config.llm.vocab_size))
  policy_logits, ref_logits, _ = logits_and_pull_back(params, zeros)
  expected, d_logits = numpy_dpo(np.asarray(policy_logits), np.asarray(ref_logits), np.asarray(rows["input_ids"]),
                                 np.asarray(rows["loss_mask"]), BETA, SMOOTHING)
  assert abs(expected - np.log(2)) > 1e-3  # the adapters moved the policy away from the reference
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  _, _, expected_grads = logits_and_pull_back(params, jnp.asarray(d_logits))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_both_answers_are_scored_in_one_forward_per_policy(base, pair_batches, monkeypatch):
  calls = []
  original = FlashVLModel.__call__
  monkeypatch.setattr(FlashVLModel, "__call__", lambda self, ids, *a, **k: calls.append(ids.shape) or original(
      self, ids, *a, **k))
  model = lora_model(base)
  batch = {k: jnp.asarray(v) for k, v in pair_batches[0].items()}
  graphdef, state = nnx.split(model)  # merged inside the trace, as the train step does (`set_lora` mutates it)
  jax.eval_shape(lambda state: dpo.dpo_sums(nnx.merge(graphdef, state), batch, beta=BETA), state)
  pairs, length = batch["chosen_input_ids"].shape
  assert calls == [(2 * pairs, length)] * 2  # the reference (LoRA off), then the policy


def test_dpo_refuses_to_train_more_than_the_adapters(base):
  model = lora_model(base)
  dpo.check_lora_only(nnx.state(model, nnx.LoRAParam), "DPO")
  with pytest.raises(ConfigError, match=r"only LoRA parameters may train.*adp\.linear_1\.kernel"):
    dpo.check_lora_only(nnx.state(model, nnx.Param), "DPO")


def test_dpo_training_raises_margin_and_preference_accuracy(base, pair_batches):
  """A short run over a fixed set of 16 pairs: the reward margin and the share of pairs whose chosen answer earns the
  higher reward rise from the start, where the policy is its reference (margin 0), as the eval step measures."""
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  tx = optax.adam(1e-2)
  objective = dpo.dpo_objective(DPOConfig(beta=0.1), max_targets=2)
  with jax.set_mesh(mesh):
    graphdef, state, shardings = create_train_state(lora_model(base, rank=8), (lora.LORA_TRAINABLE,), tx, mesh)
    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-2), shardings, mesh, objective)
    eval_step = make_eval_step(graphdef, shardings, mesh, objective)
    before = evaluate(eval_step, objective, state, pair_batches, mesh)
    history = []
    for batch in itertools.islice(itertools.cycle(pair_batches), 20):
      state, metrics = step(state, to_global(batch, mesh))
      history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    after = evaluate(eval_step, objective, state, pair_batches, mesh)
  print(f"DPO, 20 steps on 16 pairs: reward margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f}, "
        f"preference accuracy {before['reward_accuracy']:.2f} -> {after['reward_accuracy']:.2f}, "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f}; per-step margins "
        f"{np.round([m['reward_margin'] for m in history], 3).tolist()}")
  assert abs(before["reward_margin"]) < 1e-3 and before["pairs"] == after["pairs"] == 16
  assert after["reward_margin"] > 0.08
  assert after["reward_accuracy"] >= 0.75 > before["reward_accuracy"]
  assert after["loss"] < before["loss"] - 0.03
  assert all(m["pairs"] == 8 for m in history)
