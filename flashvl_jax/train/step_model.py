"""The model held by a training checkpoint step (`<output_dir>/checkpoints/<step>`), for `convert export`.

A step directory holds the `TrainState` (trainable parameters, frozen ones, optimizer state) and the data
iterator's position, not a model checkpoint. What rebuilding the model needs is written once per run beside the
steps: the run's `config.yaml` (LoRA, trainable patterns, frozen dtype), `model.json` (the resolved model config
and the init checkpoint's source metadata, such as its Hugging Face layout) and, when the init had any,
`carried.safetensors` (its unused source tensors, e.g. a released Flash-VL's SigLIP head). Only the parameters
are restored: the optimizer state (twice their size) stays on disk.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file, save_file

from flashvl_jax import checkpoint, integrity
from flashvl_jax.config import FlashVLConfig, from_dict, to_dict
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.lora import add_lora, merge_lora
from flashvl_jax.train.state import cast_frozen, trainable_filter
from flashvl_jax.weights.hf_io import CheckpointError

MODEL_INFO_FILE = "model.json"
RUN_CONFIG_FILE = "config.yaml"
STATE_ITEM = "state"
SOURCE_KEYS = ("hf_layout", "hf_config", "tied", "image_token_num", "source", "source_dtype", "carried_keys")


def run_directory(step_dir: pathlib.Path) -> pathlib.Path:
  return step_dir.parent.parent  # <output_dir>/checkpoints/<step>


def is_training_step(path: str | pathlib.Path) -> bool:
  path = pathlib.Path(path)
  return (path / STATE_ITEM).is_dir() and (run_directory(path.absolute()) / RUN_CONFIG_FILE).is_file()


def write_run_model_info(output_dir: pathlib.Path, model_cfg: FlashVLConfig, init: str | None) -> None:
  """Written by the trainer (process 0) at the start of a run: what `load_step_model` needs besides a step."""
  source = {}
  if init:
    source = (checkpoint.open_hf(init).metadata() if checkpoint.is_hf_directory(pathlib.Path(init))
              else checkpoint.read_info(init).metadata)
  info = {"config": to_dict(model_cfg), "init": init, "source": {k: source[k] for k in SOURCE_KEYS if k in source}}
  (output_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
  carried = checkpoint.carried_of(init) if init else {}
  if carried:
    save_file(carried, str(output_dir / checkpoint.CARRIED_FILE))


def run_source(output_dir: pathlib.Path) -> dict[str, Any]:
  """The init checkpoint's source metadata (Hugging Face layout, ...) as recorded for the run ({} when unknown)."""
  path = output_dir / MODEL_INFO_FILE
  return json.loads(path.read_text())["source"] if path.is_file() else {}


def run_carried(output_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """The init checkpoint's carried tensors, as copied into the run ({} when it had none)."""
  path = output_dir / checkpoint.CARRIED_FILE
  return load_file(str(path)) if path.is_file() else {}


def _restore_parameters(step_dir: pathlib.Path, params: nnx.State, frozen: nnx.State) -> Mapping[str, nnx.State]:
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                      {"params": params, "frozen": frozen})
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=cpu, global_shape=x.shape, dtype=x.dtype), item)
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(step_dir / STATE_ITEM, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                              partial_restore=True))


def load_step_model(step_dir: str | pathlib.Path) -> tuple[FlashVLModel, dict[str, Any]]:
  """(model, source metadata): the step's parameters on the host CPU, LoRA adapters merged into their layers."""
  step_dir = pathlib.Path(step_dir).absolute()
  run_dir = run_directory(step_dir)
  info_file = run_dir / MODEL_INFO_FILE
  if not info_file.is_file():
    raise CheckpointError(f"{step_dir} is a training checkpoint step, but {info_file} (written by the trainer at the "
                          f"start of a run) is missing; export the run's final model ({run_dir / 'model'}) instead")
  if integrity.has_manifest(step_dir):
    integrity.verify_manifest(step_dir)
  run_cfg = load_train_config(run_dir / RUN_CONFIG_FILE)
  info = json.loads(info_file.read_text())
  model_cfg = from_dict(FlashVLConfig, info["config"])

  def build() -> FlashVLModel:
    model = FlashVLModel(model_cfg, rngs=nnx.Rngs(0))
    if run_cfg.lora is not None:
      add_lora(model, run_cfg.lora)
    return model

  graphdef, params, frozen = nnx.split(nnx.eval_shape(build), trainable_filter(run_cfg.optimizer.trainable), ...)
  restored = _restore_parameters(step_dir, params, cast_frozen(frozen, run_cfg.model.frozen_dtype))
  model = nnx.merge(graphdef, restored["params"], restored["frozen"])
  return (merge_lora(model) if run_cfg.lora is not None else model), info["source"]
