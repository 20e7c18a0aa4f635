"""The training state (trainable parameters, frozen variables, optimizer state, step), its shardings, its
checkpoints (Orbax, with the Grain iterator).
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import flax
import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from flashvl_jax.sharding import replicated, state_shardings
from flashvl_jax.train.config import CheckpointConfig
from flashvl_jax.train.optimizer import trainable_filter

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken
  params: nnx.State  # trainable parameters, float32
  frozen: nnx.State  # every other model variable (floating point in `ModelConfig.frozen_dtype`)
  opt_state: optax.OptState  # over `params` only


def train_state_shardings(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation,
                          mesh: Mesh) -> TrainState:
  """Where each part of the state lives: parameters (and their optimizer state) by their logical axes."""
  return TrainState(step=replicated(mesh), params=state_shardings(params, mesh), frozen=state_shardings(frozen, mesh),
                    opt_state=state_shardings(jax.eval_shape(tx.init, params), mesh))


def cast_frozen(frozen: nnx.State, dtype: str) -> nnx.State:
  """The frozen variables with floating-point arrays (or their shapes) in `dtype`: bfloat16 halves their memory,
  and as they are never updated no small update can be lost to rounding."""
  target = jnp.dtype(dtype)

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == target:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, target, sharding=x.sharding)
    return x.astype(target)

  return jax.tree.map(cast, frozen)


def create_train_state(model: nnx.Module, trainable: tuple[str, ...], tx: optax.GradientTransformation,
                       mesh: Mesh, *, frozen_dtype: str = "float32") -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, shardings): the model split by the `trainable` regexes, optimizer state built sharded,
  frozen parameters cast to `frozen_dtype`, in `model` too (so its float32 originals are freed; the state and the
  model share every array)."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
  frozen = cast_frozen(frozen, frozen_dtype)
  nnx.update(model, frozen)
  shardings = train_state_shardings(params, frozen, tx, mesh)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return graphdef, TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state), shardings


def abstract_train_state(model: nnx.Module, trainable: tuple[str, ...], tx: optax.GradientTransformation,
                         mesh: Mesh, *, frozen_dtype: str = "float32") -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Like `create_train_state` for an abstract model (`nnx.eval_shape`): shapes with shardings, no arrays."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
  frozen = cast_frozen(frozen, frozen_dtype)
  shardings = train_state_shardings(params, frozen, tx, mesh)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, frozen=frozen,
                      opt_state=jax.eval_shape(tx.init, params))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return graphdef, state, shardings


class Checkpointer:
  """Async Orbax checkpoints of the `TrainState` and the Grain iterator under `directory/<step>/`.

  Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint cut off while
  being written is never listed or restored.
  """

  def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator: Iterator[Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, state: TrainState, shardings: TrainState, data_iterator: Iterator[Any]) -> TrainState:
    """The state saved at `step`, placed like `shardings`; `data_iterator` is moved to where it was."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
