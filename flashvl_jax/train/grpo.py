"""GRPO (Group Relative Policy Optimisation) on LoRA adapters, with verifiable rewards.

One GRPO step (`GRPOStep`), as in tunix's `GRPOLearner` and DeepSeekMath:
1. prompts: an ordinary conversation batch from the data pipeline; each row's last assistant answer is held back
   as the reference answer and the tokens before it are the prompt (`split_prompts`);
2. rollouts: every prompt is sampled `group_size` times by the continuous-batching engine (`flashvl_jax.engine`,
   one request per completion, temperature / top-k / top-p, `max_new_tokens`), from the current policy (the
   model with its adapters), each process on its own prompts and devices;
3. rewards: `rewards.reward_fn(grpo.rewards)` scores each decoded completion against the reference answer;
   advantages are the rewards normalised within each group, `(r - mean) / (std + 1e-4)` (`group_advantages`);
4. update(s): `num_iterations` optimizer steps on the rollouts with the clipped surrogate and the k3 KL to the
   reference policy (the adapters switched off, `lora.set_lora(model, enabled=False)`), per completion token t:

       ratio = exp(logp - logp_old),   pg = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
       kl = exp(logp_ref - logp) - (logp_ref - logp) - 1,   loss = sum_t (pg + kl_coef * kl) / completion tokens

   averaged over all completion tokens of the batch (tunix's "grpo" loss). With one iteration `logp_old` is the
   current policy itself (ratio 1, gradient of A * logp); with more, it is computed once before the updates.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flashvl_jax import sampling
from flashvl_jax.config import FlashVLConfig
from flashvl_jax.data.sources import DataError
from flashvl_jax.engine import Engine, Request
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.tokenizer import Tokenizer
from flashvl_jax.sharding import batch_sharding, process_mesh, to_process_mesh
from flashvl_jax.train.config import GRPOConfig, TrainConfig
from flashvl_jax.train.dpo import answer_logps
from flashvl_jax.train.lora import set_lora
from flashvl_jax.train.objective_spec import ObjectiveSpec, RunStep, Shapes, StepParts, batch_shapes
from flashvl_jax.train.rewards import RewardFn, reward_fn
from flashvl_jax.train.state import TrainState
from flashvl_jax.train.steps import Objective, to_global


Batch = dict[str, jax.Array]
IMAGE_KEYS = ("pixel_values", "tile_mask", "image_patch_index", "num_image_tokens")
# Rollouts decode with the weights whole on every device of the batch axes (split over 'tensor' only): decoding
# with FSDP-split weights would gather them at every token, and each process samples what one process would
# (the same computation per device, whatever the number of processes).
ROLLOUT_REPLICATED = ("data", "fsdp")
ADVANTAGE_EPS = 1e-4  # keeps groups with (almost) equal rewards finite; their advantages are ~0


# ---------------------------------------------------------------------------------------------------------------
# The objective (pure, jitted)


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """Rewards [P * G] (the G completions of a prompt adjacent) -> `(r - group mean) / (group std + 1e-4)`.

  The std is the unbiased one (ddof 1), as in tunix.
  """
  groups = np.asarray(rewards, np.float32).reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  return (centred / (groups.std(axis=1, ddof=1, keepdims=True) + ADVANTAGE_EPS)).reshape(-1)


def grpo_token_losses(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array, advantages: jax.Array, *,
                      epsilon: float, kl_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(per-token losses [N, K], {"kl", "clipped"} per token) from per-token log-probabilities [N, K]."""
  ratio = jnp.exp(logps - old_logps)
  advantages = advantages[:, None]
  surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * advantages)
  log_ref_ratio = ref_logps - logps
  kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1
  clipped = (jnp.abs(ratio - 1) > epsilon).astype(jnp.float32)
  return -surrogate + kl_coef * kl, {"kl": kl, "clipped": clipped}


def grpo_sums(model: FlashVLModel, batch: Batch, dropout_key: jax.Array | None = None, *, epsilon: float,
              kl_coef: float, max_targets: int | None) -> dict[str, jax.Array]:
  """Sums over the batch's completion tokens: {"loss", "target_tokens" (their count), "kl", "clipped"}; only "loss"
  has gradients.

  batch: rollout rows (`rollout_rows`) with "advantages" [N] and optionally "old_logps" [N, K].
  """
  set_lora(model, enabled=False)
  ref_logps, _ = answer_logps(model, batch, max_targets)
  set_lora(model, dropout_key=dropout_key)
  logps, weights = answer_logps(model, batch, max_targets)
  old_logps = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
  losses, parts = grpo_token_losses(logps, old_logps, jax.lax.stop_gradient(ref_logps), batch["advantages"],
                                    epsilon=epsilon, kl_coef=kl_coef)
  total = lambda x: jnp.sum(x * weights)
  return {"loss": total(losses), "target_tokens": jnp.sum(weights), "kl": jax.lax.stop_gradient(total(parts["kl"])),
          "clipped": total(parts["clipped"])}


def grpo_objective(cfg: GRPOConfig) -> Objective:
  """GRPO for the shared train step: the token-mean loss over all completion tokens of the rollout rows."""
  return Objective(lambda model, batch, key: grpo_sums(model, batch, key, epsilon=cfg.epsilon, kl_coef=cfg.kl_coef,
                                                        max_targets=cfg.max_new_tokens), "target_tokens")


def make_logps_fn(graphdef: nnx.GraphDef, shardings: TrainState, mesh: Mesh,
                  max_targets: int) -> Callable[[TrainState, Batch], jax.Array]:
  """The jitted `(state, rollout rows) -> per-token log-probabilities [N, K]` of the current policy."""

  def logps_fn(state: TrainState, batch: Batch) -> jax.Array:
    return answer_logps(nnx.merge(graphdef, state.params, state.frozen), batch, max_targets)[0]

  return jax.jit(logps_fn, in_shardings=(shardings, batch_sharding(mesh, 1)), out_shardings=batch_sharding(mesh, 2))


# ---------------------------------------------------------------------------------------------------------------
# Rollouts (host)


def last_answer_start(loss_mask: np.ndarray) -> np.ndarray:
  """Per row, where its last run of answer tokens begins (-1 for a row without one)."""
  mask = np.asarray(loss_mask).astype(bool)
  starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
  last = mask.shape[1] - 1 - np.argmax(starts[:, ::-1], axis=1)
  return np.where(starts.any(axis=1), last, -1)


def split_prompts(batch: dict[str, np.ndarray], tokenizer: Tokenizer) -> tuple[dict[str, np.ndarray], list[str]]:
  """A conversation batch -> (prompt rows ending with the assistant header of the last answer, answer texts).

  Raises `ValueError` for a row without an answer (nothing to score a completion against).
  """
  starts = last_answer_start(batch["loss_mask"])
  if (starts < 0).any():
    raise DataError(f"rows {np.flatnonzero(starts < 0).tolist()} have no assistant answer; GRPO scores "
                    "completions against each conversation's last answer")
  positions = np.arange(batch["input_ids"].shape[1])[None, :]
  in_prompt = positions < starts[:, None]
  prompts = {k: batch[k] for k in IMAGE_KEYS}
  prompts["input_ids"] = np.where(in_prompt, batch["input_ids"], tokenizer.pad_id).astype(np.int32)
  prompts["attention_mask"] = (in_prompt & batch["attention_mask"].astype(bool)).astype(np.int32)
  answer_mask = ~in_prompt & batch["loss_mask"].astype(bool)
  answers = [tokenizer.decode(ids[m].tolist()) for ids, m in zip(batch["input_ids"], answer_mask)]
  return prompts, answers


def rollout_rows(prompts: dict[str, np.ndarray], completions: Sequence[Sequence[int]], advantages: np.ndarray,
                 *, max_new_tokens: int, pad_id: int) -> dict[str, np.ndarray]:
  """Model rows [N, L + max_new_tokens]: each prompt's real tokens, then its completion (scored), then padding.

  prompts: the N prompt rows (right-padded, as `split_prompts` gives them, already repeated per completion).
  """
  rows, length = prompts["input_ids"].shape
  width = length + max_new_tokens
  input_ids = np.full((rows, width), pad_id, np.int32)
  attention_mask = np.zeros((rows, width), np.int32)
  loss_mask = np.zeros((rows, width), np.int32)
  for row, (ids, mask, completion) in enumerate(zip(prompts["input_ids"], prompts["attention_mask"], completions)):
    prompt = ids[mask.astype(bool)]
    end = len(prompt) + len(completion)
    input_ids[row, :end] = np.concatenate([prompt, np.asarray(completion, np.int32)])
    attention_mask[row, :end] = 1
    loss_mask[row, len(prompt):end] = 1
  out = {k: prompts[k] for k in IMAGE_KEYS}
  return out | {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
                "advantages": np.asarray(advantages, np.float32)}


def repeat_rows(arrays: dict[str, np.ndarray], times: int) -> dict[str, np.ndarray]:
  """Every row `times` times in a row (a prompt's group of completions stays adjacent)."""
  return {k: np.repeat(v, times, axis=0) for k, v in arrays.items()}


def global_prompt_rows(local_rows: np.ndarray, process_index: int | None = None,
                       process_count: int | None = None) -> np.ndarray:
  """Where this process's prompt rows sit in the global batch of one process: the data pipeline gives process p
  of P the records p, p + P, p + 2P, ... (`data.pipeline`), so local row r is global row p + P * r. Seeding a
  rollout by its global row makes P processes sample what one process would (without shuffling)."""
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return p + count * np.asarray(local_rows)


def rollout_metrics(rewards: np.ndarray, lengths: np.ndarray, group_size: int) -> dict[str, float]:
  """Reward mean / std, the fraction of groups whose rewards differ, the mean completion length: over the
  rollouts of every process (all processes call this together)."""
  if jax.process_count() > 1:
    rewards, lengths = (np.asarray(multihost_utils.process_allgather(x)).reshape(-1) for x in (rewards, lengths))
  spread = rewards.reshape(-1, group_size).std(axis=1) > 0
  return {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
          "groups_with_signal": float(spread.mean()), "completion_length": float(lengths.mean())}


def sample_seed(seed: int, step: int, rollout: int) -> int:
  """A rollout's sampling seed: different for every step and rollout, the same when a run is repeated or resumed."""
  return int(np.random.default_rng((seed, step, rollout)).integers(2**31))


class GRPOStep:
  """`(state, conversation batch) -> (state, metrics)`: rollouts, rewards, advantages and the update(s).

  engine: a continuous-batching `Engine` of a module with the structure of the train state (abstract is enough),
  on this process's devices (`sharding.process_mesh`); each rollout hands it the state's current variables
  (`Engine.complete`), so rollouts come from the current policy and nothing else holds parameters. The G
  completions of every prompt are separate requests, admitted into free slots as others finish.

  With several processes, each one rolls out the prompts of its own rows (host arrays, as the data pipeline
  gives them) on its own devices; the rewards and advantages of a group stay on the process that sampled it, the
  rollout metrics are gathered from all processes and the update runs on the global rollout rows.
  """

  def __init__(self, engine: Engine, tokenizer: Tokenizer, train_step: Callable,
               logps_fn: Callable | None, cfg: GRPOConfig, reward: RewardFn,
               to_device: Callable[[dict[str, np.ndarray]], Batch]):
    if cfg.num_iterations > 1 and logps_fn is None:
      raise ValueError("grpo.num_iterations > 1 needs logps_fn (make_logps_fn) for the old policy's log-probs")
    self.engine, self.tokenizer, self.train_step, self.logps_fn = engine, tokenizer, train_step, logps_fn
    self.cfg, self.reward, self.to_device = cfg, reward, to_device

  def rollout(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """(rollout rows with advantages, rollout metrics) for the prompts of `batch`, sampled from `state`."""
    cfg, tokenizer = self.cfg, self.tokenizer
    prompts, answers = split_prompts(batch, tokenizer)
    prompts = repeat_rows(prompts, cfg.group_size)
    step = int(state.step)
    params = sampling.SamplingParams(True, cfg.temperature, cfg.top_k, cfg.top_p)
    group = np.arange(len(prompts["input_ids"]))
    rollout_ids = global_prompt_rows(group // cfg.group_size) * cfg.group_size + group % cfg.group_size
    requests = [Request(str(i), ids[mask.astype(bool)], cfg.max_new_tokens, on_tokens=None,
                        pixel_values=pixels, image_patch_index=index, sampling=params,
                        seed=sample_seed(cfg.seed, step, int(i)))
                for i, ids, mask, pixels, index in zip(rollout_ids, prompts["input_ids"], prompts["attention_mask"],
                                                       prompts["pixel_values"], prompts["image_patch_index"])]
    variables = to_process_mesh(nnx.merge_state(state.params, state.frozen), self.engine.mesh,
                                replicate=ROLLOUT_REPLICATED)
    completions = self.engine.complete(requests, variables)
    texts = [tokenizer.decode(c) for c in completions]
    rewards = np.asarray([self.reward(t, a) for t, a in zip(texts, np.repeat(answers, cfg.group_size))], np.float32)
    advantages = group_advantages(rewards, cfg.group_size)
    rows = rollout_rows(prompts, completions, advantages, max_new_tokens=cfg.max_new_tokens, pad_id=tokenizer.pad_id)
    return rows, rollout_metrics(rewards, np.asarray([len(c) for c in completions], np.float32), cfg.group_size)

  def __call__(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
    rows, rollout_metrics = self.rollout(state, batch)
    device_rows = self.to_device(rows)
    if self.cfg.num_iterations > 1:
      device_rows["old_logps"] = self.logps_fn(state, device_rows)
    for _ in range(self.cfg.num_iterations):
      state, metrics = self.train_step(state, device_rows)
    return state, {**{k: float(v) for k, v in jax.device_get(metrics).items()}, **rollout_metrics}


class GRPOSpec(ObjectiveSpec):
  """GRPO in the trainer: conversations as prompts, LoRA only; each step rolls out through the batching engine
  (`GRPOStep`) and trains on the rollout rows; no held-out loss (the accuracy is by generation)."""

  name = "grpo"
  needs_lora = True
  evaluates_by_loss = False
  generates_by_rollouts = True

  def loss(self, cfg: TrainConfig) -> Objective:
    return grpo_objective(cfg.grpo)

  def batch_shapes(self, cfg: TrainConfig, model_cfg: FlashVLConfig) -> Shapes:
    rows, length = self.model_rows(cfg)
    return batch_shapes(rows, length, model_cfg) | {"advantages": ((rows,), jnp.float32)}

  def model_rows(self, cfg: TrainConfig) -> tuple[int, int]:
    return cfg.global_batch_size * cfg.grpo.group_size, cfg.data.max_length + cfg.grpo.max_new_tokens

  def lm_head_tokens_per_row(self, cfg: TrainConfig) -> int | None:
    return None  # the scored completions are cut to grpo.max_new_tokens by the objective itself

  def check_batch(self, cfg: TrainConfig, local: dict[str, np.ndarray]) -> None:
    pass  # the batch holds prompts; what is scored are the completions, at most grpo.max_new_tokens each

  def make_step(self, parts: StepParts) -> RunStep:
    cfg, graphdef, state, mesh = parts.cfg, parts.graphdef, parts.state, parts.mesh
    variables = nnx.merge_state(state.params, state.frozen)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    rows = cfg.global_batch_size // jax.process_count() * cfg.grpo.group_size
    # on this process's devices, holding no parameters: each rollout passes the state's
    engine = Engine(nnx.merge(graphdef, shapes), slots=cfg.grpo.rollout_slots or rows, mesh=process_mesh(mesh),
                    max_seq_len=cfg.data.max_length + cfg.grpo.max_new_tokens, max_queue=rows)
    return GRPOStep(engine, parts.tokenizer, parts.train_step,
                    make_logps_fn(graphdef, parts.shardings, mesh, cfg.grpo.max_new_tokens), cfg.grpo,
                    reward_fn(cfg.grpo.rewards), lambda rollout: to_global(rollout, mesh))
