"""Direct Preference Optimisation (the paper's stage 5): sigmoid DPO on LoRA adapters, reference = LoRA off.

For a prompt x with a chosen answer y_w and a rejected one y_l, with log-likelihoods summed over answer tokens,

    r(y) = beta * (log pi(y | x) - log pi_ref(y | x)),     loss = -log sigmoid(r(y_w) - r(y_l))

(with `label_smoothing` e: `-(1 - e) log sigmoid(d) - e log sigmoid(-d)`, conservative DPO), averaged over
pairs, as in tunix's `dpo_loss_fn`. pi is the model with its LoRA adapters and pi_ref the same weights with
the adapters switched off (`lora.set_lora(model, enabled=False)`), so no second copy of the model exists; the
reference forward runs in the same jitted step, without gradients. Both answers of every pair are scored in one forward:
the pipeline's `chosen_*` and `rejected_*` rows are concatenated along the batch and the image arrays repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flashvl_jax.config import ConfigError, FlashVLConfig
from flashvl_jax.data.pipeline import TEXT_KEYS
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.train.config import DPOConfig, TrainConfig
from flashvl_jax.train.lora import set_lora
from flashvl_jax.train.objective_spec import ObjectiveSpec, Shapes, batch_shapes
from flashvl_jax.train.steps import Objective, model_targets

Batch = dict[str, jax.Array]


def check_lora_only(params: nnx.State, objective: str) -> None:
  """Raises unless every trainable parameter is a LoRA parameter: only then is 'LoRA off' the frozen start."""
  others = [".".join(map(str, p)) for p, v in nnx.to_flat_state(params) if not isinstance(v, nnx.LoRAParam)]
  if others:
    raise ConfigError(f"{objective} uses the model with its LoRA adapters off as the reference, so only LoRA "
                      f"parameters may train (optimizer.trainable: ['\\.lora_(a|b)$']); these also train: "
                      f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}")


def concat_pairs(batch: Batch) -> Batch:
  """A DPO batch of B pairs -> 2B model rows: chosen rows, then rejected rows, image arrays repeated."""
  pairs = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in TEXT_KEYS}
  images = {k: jnp.concatenate([v, v]) for k, v in batch.items() if not k.startswith(("chosen_", "rejected_"))}
  return pairs | images


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probabilities [N, K] (fp32) of `targets` under `logits` [N, K, V]."""
  return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def answer_logps(model: FlashVLModel, rows: Batch, max_targets: int | None) -> tuple[jax.Array, jax.Array]:
  """(per-token log-probabilities [N, K] of each row's answer tokens, weights [N, K]): one forward."""
  logits, targets, weights = model_targets(model, rows, max_targets)
  return token_logps(logits, targets), weights


def dpo_losses(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
               ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """(per-pair losses [B], per-pair rewards {"chosen", "rejected"}) from summed answer log-likelihoods [B]."""
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  margin = chosen_reward - rejected_reward
  losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)
  return losses, {"chosen": chosen_reward, "rejected": rejected_reward}


def dpo_sums(model: FlashVLModel, batch: Batch, dropout_key: jax.Array | None = None, *, beta: float,
             label_smoothing: float = 0.0, max_targets: int | None = None) -> dict[str, jax.Array]:
  """Sums over the batch's valid pairs (both answers have a target token) of the loss and the DPO metrics.

  Returns {"loss", "pairs", "target_tokens", "reward_chosen", "reward_rejected", "reward_margin",
  "reward_accuracy", "logp_chosen", "logp_rejected"}; divide by "pairs" for means (not "target_tokens", the
  scored answer tokens of both rows). Only "loss" carries gradients.
  """
  rows = concat_pairs(batch)
  pairs = batch["chosen_input_ids"].shape[0]
  set_lora(model, enabled=False)
  ref_logps, _ = answer_logps(model, rows, max_targets)
  set_lora(model, dropout_key=dropout_key)
  logps, weights = answer_logps(model, rows, max_targets)
  policy = jnp.sum(logps * weights, axis=-1)
  ref = jax.lax.stop_gradient(jnp.sum(ref_logps * weights, axis=-1))
  has_answer = jnp.any(weights > 0, axis=-1)
  valid = (has_answer[:pairs] & has_answer[pairs:]).astype(jnp.float32)  # padding rows of a short batch drop out
  losses, rewards = dpo_losses(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta, label_smoothing)
  rewards = jax.tree.map(jax.lax.stop_gradient, rewards)
  total = lambda x: jnp.sum(x * valid)
  return {"loss": total(losses), "pairs": jnp.sum(valid), "target_tokens": jnp.sum(weights),
          "reward_chosen": total(rewards["chosen"]), "reward_rejected": total(rewards["rejected"]),
          "reward_margin": total(rewards["chosen"] - rewards["rejected"]),
          "reward_accuracy": total((rewards["chosen"] > rewards["rejected"]).astype(jnp.float32)),
          "logp_chosen": total(jax.lax.stop_gradient(policy[:pairs])),
          "logp_rejected": total(jax.lax.stop_gradient(policy[pairs:]))}


def dpo_objective(cfg: DPOConfig, max_targets: int | None = None) -> Objective:
  """DPO for the shared train / eval steps: means over valid pairs; token counts of the 2B scored rows (the
  reference forward is not in the FLOP count)."""
  return Objective(lambda model, batch, key: dpo_sums(model, batch, key, beta=cfg.beta,
                                                       label_smoothing=cfg.label_smoothing, max_targets=max_targets),
                   "pairs", rows=concat_pairs, counts=("pairs", "target_tokens"))


class DPOSpec(ObjectiveSpec):
  """DPO in the trainer: preference pairs (chosen and rejected rows of the same prompt), LoRA only, the held-out
  preference accuracy at the end."""

  name = "dpo"
  records = "preference"
  needs_lora = True

  def loss(self, cfg: TrainConfig) -> Objective:
    return dpo_objective(cfg.dpo, cfg.max_target_tokens)

  def batch_shapes(self, cfg: TrainConfig, model_cfg: FlashVLConfig) -> Shapes:
    return batch_shapes(cfg.global_batch_size, cfg.data.max_length, model_cfg,
                        tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in TEXT_KEYS))

  def model_rows(self, cfg: TrainConfig) -> tuple[int, int]:
    return 2 * cfg.global_batch_size, cfg.data.max_length

  def report(self, final: dict[str, float]) -> str | None:
    return f"eval preference accuracy: {final['reward_accuracy']:.2f}" if "reward_accuracy" in final else None
