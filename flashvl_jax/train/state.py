"""The training state (trainable parameters, frozen variables, optimizer state, step), its shardings, its
checkpoints (Orbax, with the Grain iterator).
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any, Iterator

import flax
import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flashvl_jax import integrity
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
  being written is never listed or restored. Once a step is complete, process 0 writes its `checksums.json`
  (`integrity`); `restore_newest` verifies it and falls back to older steps when the newest is damaged. The
  directory is probed for writing at once, so a read-only or full disk fails before training starts.
  """

  def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(directory).absolute()
    integrity.probe_writable(self.directory, "checkpoint directory")
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator: Iterator[Any]) -> None:
    self.wait()  # the previous save is complete (Orbax would wait for it too) and gets its checksums
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator))
    integrity.storage_errors(lambda: self.manager.save(step, args=args), self.directory, "checkpoint directory")

  def restore(self, step: int, state: TrainState, shardings: TrainState, data_iterator: Iterator[Any]) -> TrainState:
    """The state saved at `step`, placed like `shardings`; `data_iterator` is moved to where it was."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def restore_newest(self, state: TrainState, shardings: TrainState,
                     data_iterator: Iterator[Any]) -> tuple[int, TrainState, list[str]]:
    """(step, state, skipped): the newest checkpoint that verifies and restores. Damaged newer steps are renamed
    `<step>.damaged` (kept for inspection, never listed again) and described in `skipped`."""
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = self.directory / str(step)
      try:
        if integrity.has_manifest(step_dir):  # none: cut off between Orbax's rename and the checksums
          integrity.verify_manifest(step_dir)
        restored = self.restore(step, state, shardings, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # a checksum mismatch, or Orbax failing to read it
        skipped.append(f"step {step}: {str(e).splitlines()[0]}")
        self._set_aside(step_dir)
        continue
      if skipped:
        self.manager.reload()
      return step, restored, skipped
    raise integrity.CorruptCheckpointError(f"no checkpoint in {self.directory} can be restored: " + "; ".join(skipped)
                                           + ". Start over with checkpoint.restart=true")

  def _set_aside(self, step_dir: pathlib.Path) -> None:
    if jax.process_index() == 0:
      step_dir.rename(step_dir.with_name(step_dir.name + ".damaged"))
    multihost_utils.sync_global_devices(f"set aside {step_dir}")

  def wait(self) -> None:
    """Waits for an in-flight save, then seals every complete step that has no checksums yet."""
    integrity.storage_errors(self.manager.wait_until_finished, self.directory, "checkpoint directory")
    if jax.process_index() == 0:
      for step in self.manager.all_steps():
        if not integrity.has_manifest(self.directory / str(step)):
          integrity.write_manifest(self.directory / str(step))

  def abandon(self) -> None:
    """After a failure: lets an in-flight save end (its error, e.g. a full disk, is dropped: the caller's error is
    the one reported) and removes the temporary folders of unfinished saves."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    if jax.process_index() == 0:
      for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)

  def close(self) -> None:
    self.wait()
    self.manager.close()
