"""The jitted train and eval steps, shared by every objective (SFT, DPO, GRPO).

An `Objective` says what a step minimises: `sums(model, batch, dropout_key)` returns sums over the batch
("loss" carries the gradient) and `normalizer` names the count that turns sums into means (target tokens for
SFT and GRPO, preference pairs for DPO). The train step takes the global batch in `grad_accum_steps`
micro-batches, adds fp32 gradients of the summed loss and divides by the batch's total count, so an
accumulated step equals the big-batch step however unevenly the counts fall.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.sharding import batch_sharding, replicated
from flashvl_jax.train.lora import set_lora
from flashvl_jax.train.losses import answer_matches, cross_entropy_sum, select_targets

if TYPE_CHECKING:
  from flashvl_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a step minimises; see the module docstring."""

  sums: Callable[[FlashVLModel, Batch, jax.Array | None], Sums]
  normalizer: str
  ratios: Mapping[str, str] = dataclasses.field(default_factory=dict)  # metric -> the count it is divided by
  rows: Callable[[Batch], Batch] = lambda batch: batch  # the model rows of a batch, for token and FLOP counts
  counts: tuple[str, ...] = ("target_tokens",)  # sums that stay sums in the metrics

  def means(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums -> means (counts stay sums)."""
    return {k: v if k in self.counts else v / jnp.maximum(sums[self.ratios.get(k, self.normalizer)], 1.0)
            for k, v in sums.items()}


def model_targets(model: FlashVLModel, batch: Batch, max_targets: int | None) -> tuple[jax.Array, ...]:
  """(logits at the scored positions [B, K, V], targets [B, K], weights [B, K])."""
  positions, targets, weights = select_targets(batch["input_ids"], batch["loss_mask"], max_targets)
  logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                 position_ids=batch.get("position_ids"), image_patch_index=batch["image_patch_index"],
                 segment_ids=batch.get("segment_ids"), logits_at=positions)
  return logits, targets, weights


def sft_objective(max_targets: int | None = None) -> Objective:
  """Token-mean cross-entropy on the answer tokens; "answer_accuracy" counts rows whose every answer token is
  the argmax (teacher forcing: the greedy answer is exactly right)."""

  def sums(model: FlashVLModel, batch: Batch, dropout_key: jax.Array | None) -> Sums:
    set_lora(model, dropout_key=dropout_key)
    logits, targets, weights = model_targets(model, batch, max_targets)
    loss, tokens = cross_entropy_sum(logits, targets, weights)
    correct, answered = answer_matches(logits, targets, weights)
    return {"loss": loss, "target_tokens": tokens, "answer_accuracy": correct.astype(jnp.float32),
            "answered": answered.astype(jnp.float32)}

  return Objective(sums, "target_tokens", ratios={"answer_accuracy": "answered"}, counts=("target_tokens", "answered"))


def split_microbatches(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, ...: every micro-batch spans all devices."""
  x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(None, ("data", "fsdp")))


def batch_stats(batch: Batch) -> dict[str, jax.Array]:
  """What the analytic FLOPs and tokens/s need: real tokens, squared row lengths, tiles, image tokens."""
  lengths = batch["attention_mask"].sum(-1).astype(jnp.float32)
  return {"tokens": lengths.sum(), "sum_sq_lengths": jnp.square(lengths).sum(),
          "tiles": batch["tile_mask"].sum().astype(jnp.float32),
          "image_tokens": batch["num_image_tokens"].sum().astype(jnp.float32)}


def accumulate_gradients(sums_fn: Callable, params: nnx.State, frozen: nnx.State, batch: Batch, key: jax.Array,
                         grad_accum_steps: int, params_shardings: nnx.State) -> tuple[nnx.State, Sums]:
  """fp32 gradients of `sums_fn(params, frozen, micro, key)["loss"]` and every sum, added over micro-batches.

  Micro-batch i gets the dropout key `fold_in(key, i)`.
  """

  def loss(params, frozen, micro, key):
    sums = sums_fn(params, frozen, micro, key)
    return sums["loss"], sums

  def add(carry, xs):
    grads, totals = carry
    index, micro = xs
    # Tying the weights to the micro-batch keeps XLA from hoisting their FSDP all-gathers out of the loop, which
    # would hold every layer's gathered weights for the whole step (docs/training.md, "TPU fit").
    weights, fixed, micro = jax.lax.optimization_barrier((params, frozen, micro))
    (_, sums), g = jax.value_and_grad(loss, has_aux=True)(weights, fixed, micro, jax.random.fold_in(key, index))
    grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
    return (grads, jax.tree.map(jnp.add, totals, sums)), None

  micro = jax.tree.map(lambda x: split_microbatches(x, grad_accum_steps), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sums_fn, params, frozen, first, key))
  zeros = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                                           params_shardings)
  (grads, totals), _ = jax.lax.scan(add, (zeros, zero_sums), (jnp.arange(grad_accum_steps), micro))
  return grads, totals


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    shardings: TrainState, mesh: Mesh, objective: Objective, *, grad_accum_steps: int = 1,
                    dropout_seed: int = 0) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The jitted `(state, global batch) -> (state, metrics)`; the state is donated."""

  def sums_fn(params, frozen, micro, key):
    return objective.sums(nnx.merge(graphdef, params, frozen), micro, key)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    grads, sums = accumulate_gradients(sums_fn, state.params, state.frozen, batch, key, grad_accum_steps,
                                       shardings.params)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums[objective.normalizer], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**objective.means(sums), "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
               **batch_stats(objective.rows(batch))}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh, 1)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, shardings: TrainState, mesh: Mesh,
                   objective: Objective) -> Callable[[TrainState, Batch], Sums]:
  """The jitted `(state, global batch) -> the objective's sums` (no dropout, no update)."""

  def eval_step(state: TrainState, batch: Batch) -> Sums:
    return objective.sums(nnx.merge(graphdef, state.params, state.frozen), batch, None)

  return jax.jit(eval_step, in_shardings=(shardings, batch_sharding(mesh, 1)), out_shardings=replicated(mesh))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
  """This process's rows -> global arrays split over ('data', 'fsdp') (all processes call it together)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def host_metrics(state: TrainState, metrics: dict[str, jax.Array]) -> tuple[TrainState, dict[str, float]]:
  """A step's metrics as host floats (waits for the step)."""
  return state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(eval_step: Callable, objective: Objective, state: TrainState, batches: Iterable[dict[str, np.ndarray]],
             mesh: Mesh) -> dict[str, float]:
  """The objective's means (and its counts) over all of `batches` (every process passes its own rows)."""
  totals: collections.Counter[str] = collections.Counter()
  for batch in batches:
    totals.update(jax.device_get(eval_step(state, to_global(batch, mesh))))
  return {k: float(v) for k, v in objective.means(dict(totals)).items()}
