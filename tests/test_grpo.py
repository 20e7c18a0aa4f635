"""GRPO: advantages and the clipped / KL objective against NumPy, prompts and rollout rows, rewards, a short run."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.data.pipeline import make_dataset
from flashvl_jax.engine import Engine
from flashvl_jax.data.synthetic import SyntheticConfig, SyntheticVQA
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer
from flashvl_jax import sharding
from flashvl_jax.sharding import create_sharded, make_mesh
from flashvl_jax.train import grpo, lora, rewards
from flashvl_jax.train.losses import select_targets
from flashvl_jax.train.config import GRPOConfig, LoraConfig, load_train_config
from flashvl_jax.train.state import create_train_state
from flashvl_jax.train.steps import make_train_step, sft_objective, to_global


@pytest.fixture(scope="module")
def cfg():
  return load_config("tiny-static", ["vision.num_hidden_layers=1", "llm.num_hidden_layers=1"])


@pytest.fixture(scope="module")
def processor(cfg):
  return Processor(cfg, load_tokenizer("qwen2.5"), max_length=48)


def count_source(max_count, split="train"):
  return SyntheticVQA(4096 if split == "train" else 64, split,
                      SyntheticConfig(image_size=64, question_types=("count",), max_count=max_count))


def count_batches(processor, *, max_count, batch_size, split="train", seed=0):
  source = count_source(max_count, split)
  return iter(make_dataset(source, processor, batch_size=batch_size, seed=seed, shuffle=split == "train",
                           num_threads=0))


def test_group_advantages_match_numpy():
  rng = np.random.default_rng(0)
  rewards_ = rng.integers(0, 2, size=12).astype(np.float32)
  rewards_[4:8] = 1.0  # a group whose completions all earn the same reward: no signal
  got = grpo.group_advantages(rewards_, 4)
  for g in range(3):
    r = rewards_[4 * g:4 * g + 4].astype(np.float64)
    np.testing.assert_allclose(got[4 * g:4 * g + 4], (r - r.mean()) / (r.std(ddof=1) + 1e-4), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[4:8], 0.0)


def test_clipped_objective_and_kl_match_numpy():
  rng = np.random.default_rng(1)
  logps, old, ref = (rng.normal(-2, 0.5, size=(3, 5)) for _ in range(3))
  advantages = np.array([1.5, -0.7, 0.3])
  eps, beta = 0.2, 0.05
  losses, parts = grpo.grpo_token_losses(*map(jnp.asarray, (logps, old, ref, advantages)), epsilon=eps, kl_coef=beta)
  ratio = np.exp(logps - old)
  a = advantages[:, None]
  unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
  kl = np.exp(ref - logps) - (ref - logps) - 1
  np.testing.assert_allclose(losses, -np.minimum(unclipped, clipped) + beta * kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parts["kl"], kl, rtol=1e-5, atol=1e-6)
  assert 0 < np.asarray(parts["clipped"]).sum() < ratio.size  # both branches occur in this draw
  grad = jax.grad(lambda lp: grpo.grpo_token_losses(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(advantages),
                                                    epsilon=eps, kl_coef=beta)[0].sum())(jnp.asarray(logps))
  surrogate_grad = np.where(unclipped <= clipped, -ratio * a, 0.0)  # the clipped branch is flat in logp
  np.testing.assert_allclose(grad, surrogate_grad + beta * (1 - np.exp(ref - logps)), rtol=1e-5, atol=1e-7)


def test_rewards():
  assert rewards.exact_match(" Three.", "3") == 1.0 and rewards.exact_match("3 circles", "3") == 0.0
  assert rewards.REWARDS["numeric"]("There are 3 circles", "3") == 1.0
  both = rewards.reward_fn(["exact_match", "numeric"])
  assert both("3", "3") == 2.0 and both("I see 3", "3") == 1.0 and both("4", "3") == 0.0
  with pytest.raises(ConfigError, match="'exact'"):
    rewards.reward_fn(["exact"])
  own = rewards.reward_fn(["flashvl_jax.testing.rewards:character_variety", "exact_match"])
  assert own("aab", "aab") == 1.0 + 2 / 3
  for name, message in (("no_such_module_x:f", "cannot import 'no_such_module_x'"),
                        ("flashvl_jax.testing.rewards:nothing", "has no 'nothing'"),
                        ("flashvl_jax.testing.rewards:__doc__", "is not a function")):
    with pytest.raises(ConfigError, match=message):
      rewards.reward_fn([name])
  with pytest.raises(ConfigError, match="cannot import"):  # at config time, before anything is built
    load_train_config("grpo", ["data.path=p.jsonl", "grpo.rewards=[nope:f]"])


def test_prompts_and_rollout_rows(processor):
  """Prompts end with the last answer's assistant header; rollout rows score exactly the completion tokens."""
  tokenizer = processor.tokenizer
  batch = next(count_batches(processor, max_count=4, batch_size=3, split="eval"))
  prompts, answers = grpo.split_prompts(batch, tokenizer)
  assert answers == [count_source(4, "eval")[i]["answer"] for i in range(3)]
  for ids, mask in zip(prompts["input_ids"], prompts["attention_mask"]):
    assert tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False).endswith("<|im_start|>assistant\n")
  completions = [[tokenizer.encode("7")[0], tokenizer.im_end_id], [11, 12, 13], []]
  rows = grpo.rollout_rows(prompts, completions, np.array([1.0, -1.0, 0.0]), max_new_tokens=3,
                           pad_id=tokenizer.pad_id)
  assert rows["input_ids"].shape == (3, prompts["input_ids"].shape[1] + 3)
  _, targets, weights = select_targets(jnp.asarray(rows["input_ids"]), jnp.asarray(rows["loss_mask"]), 3)
  for row, completion in enumerate(completions):
    np.testing.assert_array_equal(np.asarray(targets[row])[np.asarray(weights[row]) > 0], completion)
  with pytest.raises(ValueError, match="no assistant answer"):
    grpo.split_prompts(dict(batch, loss_mask=np.zeros_like(batch["loss_mask"])), tokenizer)
  with pytest.raises(ConfigError, match="group_size"):
    GRPOConfig(group_size=1)


def test_rollout_seeds_follow_the_global_row_of_each_prompt(processor):
  """Process p of P holds records p, p + P, ... of every global batch: `global_prompt_rows` maps its local rows to
  the rows one process would give them, so both sample each prompt with the same seeds."""
  source = count_source(4)
  batch = lambda **shard: next(iter(make_dataset(source, processor, batch_size=8 // shard.get("shard_count", 1),
                                                 shuffle=False, num_threads=0, **shard)))
  whole = batch()
  for p in range(2):
    part = batch(shard_index=p, shard_count=2)
    rows = grpo.global_prompt_rows(np.arange(4), process_index=p, process_count=2)
    for key in ("input_ids", "pixel_values"):
      np.testing.assert_array_equal(part[key], whole[key][rows])
  np.testing.assert_array_equal(grpo.global_prompt_rows(np.arange(3)), np.arange(3))  # this (single) process


def test_rollout_variables_are_whole_on_each_device_and_keep_unsplit_buffers(cfg):
  """`to_process_mesh`: the train state on this process's devices with the batch axes gathered (what rollouts
  decode with); arrays that were not split keep their buffers. `process_mesh` refuses devices that are not a
  block of the mesh (here: process 1 owning a diagonal of a 2 x 2 mesh)."""
  mesh = make_mesh({"data": 2, "fsdp": 4})
  local = sharding.process_mesh(mesh)
  assert local.devices.tolist() == mesh.devices.tolist()  # one process: the whole mesh
  state = nnx.state(create_sharded(lambda: FlashVLModel(cfg, rngs=nnx.Rngs(0)), mesh))
  moved = sharding.to_process_mesh(state, local, replicate=grpo.ROLLOUT_REPLICATED)
  gathered = kept = 0
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(moved), strict=True):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    assert not {"data", "fsdp"} & set(jax.tree.leaves(tuple(after.sharding.spec)))
    pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    if before.sharding.spec == after.sharding.spec:
      kept += pointer(after) == pointer(before)
    else:
      gathered += 1
  assert gathered > 0 and kept > 0
  device = lambda p: types.SimpleNamespace(process_index=p)
  diagonal = types.SimpleNamespace(devices=np.array([[device(0), device(1)], [device(1), device(0)]]),
                                   shape={"data": 2, "fsdp": 2})
  with pytest.raises(ValueError, match="do not form one block"):
    sharding.process_mesh(diagonal)


def test_grpo_raises_the_reward(cfg, processor):
  """SFT then GRPO-LoRA, CPU-sized. A tiny model does not learn to count in seconds (not even with supervision),
  so the task tests what rewards alone can teach: the SFT'd policy answers counts 1-4 without looking (its
  answers do not depend on the image), while the GRPO prompts only ever hold 1 or 2 shapes. With the numeric reward,
  group advantages and the clipped objective (KL to the adapters-off reference), the policy learns that 3 and 4
  never pay: the probability that a sampled answer is the correct count, measured exactly on held-out prompts,
  rises."""
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  tokenizer = processor.tokenizer
  held_out, answers = grpo.split_prompts(next(count_batches(processor, max_count=2, batch_size=32, split="eval")),
                                         tokenizer)
  correct_ids = jnp.asarray([tokenizer.encode(a)[0] for a in answers])
  last = jnp.asarray(held_out["attention_mask"].sum(1) - 1)[:, None]
  held_out = {k: jnp.asarray(v) for k, v in held_out.items()}

  with jax.set_mesh(mesh):
    tx = optax.adam(5e-3)
    graphdef, state, shardings = create_train_state(FlashVLModel(cfg, rngs=nnx.Rngs(0)), (".*",), tx, mesh)
    sft_step = make_train_step(graphdef, tx, optax.constant_schedule(5e-3), shardings, mesh, sft_objective(2))
    for batch in itertools.islice(count_batches(processor, max_count=4, batch_size=16), 30):
      state, _ = sft_step(state, to_global(batch, mesh))
    model = nnx.merge(graphdef, state.params, state.frozen)

    lora.add_lora(model, LoraConfig(rank=8, alpha=16.0))
    grpo_cfg = GRPOConfig(group_size=8, max_new_tokens=1, temperature=1.0, kl_coef=0.001, rewards=("numeric",))
    tx = optax.adam(1e-2)
    graphdef, state, shardings = create_train_state(model, (lora.LORA_TRAINABLE,), tx, mesh)
    train_step = make_train_step(graphdef, tx, optax.constant_schedule(1e-2), shardings, mesh,
                                 grpo.grpo_objective(grpo_cfg))
    engine = Engine(model, slots=16, mesh=mesh, max_seq_len=processor.max_length + grpo_cfg.max_new_tokens,
                    max_queue=32)  # 32 rollouts per step through 16 slots
    step = grpo.GRPOStep(engine, tokenizer, train_step, None, grpo_cfg,
                         rewards.reward_fn(grpo_cfg.rewards), lambda rows: to_global(rows, mesh))

    @jax.jit
    def p_correct(state):
      logits = nnx.merge(graphdef, state.params, state.frozen)(
          held_out["input_ids"], held_out["pixel_values"], held_out["attention_mask"],
          image_patch_index=held_out["image_patch_index"], logits_at=last)
      return jnp.mean(jnp.take_along_axis(jax.nn.softmax(logits[:, 0]), correct_ids[:, None], axis=1))

    before = float(p_correct(state))
    history = []
    for batch in itertools.islice(count_batches(processor, max_count=2, batch_size=4, seed=1), 12):
      state, metrics = step(state, batch)
      history.append(metrics)
    after = float(p_correct(state))
  rollout_reward = [m["reward"] for m in history]
  print(f"GRPO: P(correct count) on held-out prompts {before:.3f} -> {after:.3f}; rollout mean reward per step "
        f"{np.round(rollout_reward, 2).tolist()}; KL {history[-1]['kl']:.4f}")
  assert after > before + 0.04
  assert all(m["completion_length"] == 1 and m["target_tokens"] == 32 for m in history)
  assert history[-1]["kl"] > 0  # the policy left the reference
