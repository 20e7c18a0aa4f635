"""`convert export`: a model checkpoint (or a training checkpoint step) -> Hugging Face safetensors + config.json.

Keys and config are written in the layout the source had, recorded in metadata.json at conversion: transformers
or Apple AIMv2 keys, a `vision_model.` prefix, tied or untied LM head; Flash-VL in the released layout. The
source's config.json is written back with our sizes over it (so e.g. remote-code `auto_map` survives). Tensors are
restored from Orbax one safetensors shard at a time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from safetensors.numpy import save_file

from convert.hf_to_orbax import progress_bar
from flashvl_jax import checkpoint, integrity
from flashvl_jax.config import VisionConfig
from flashvl_jax.preprocess.tiling import max_image_tokens
from flashvl_jax.train import step_model
from flashvl_jax.weights import aimv2 as aimv2_weights
from flashvl_jax.weights import flashvl as flashvl_weights
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights.hf_io import INDEX_FILE, SINGLE_FILE, param_shapes
from flashvl_jax.weights.mapping import ExportStep, Table, run_export

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # a shard is held in memory while it is written
DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4.x / 5.x spellings


def vision_table(cfg: VisionConfig, layout: Mapping[str, str]) -> Table:
  """Our vision tower <-> HF keys spelled as `layout` says (`checkpoint.vision_layout`)."""
  if layout.get("vision") == "apple":
    if cfg.kind != "aimv2":
      raise ValueError(f"the Apple layout exists for AIMv2 only, not {cfg.kind!r}")
    return aimv2_weights.apple_table(cfg)
  table = checkpoint.VISION_WEIGHTS[cfg.kind].table(cfg)
  prefix = layout.get("vision_prefix", "")
  return table.with_prefix(prefix, "") if prefix else table


def export_table(info: checkpoint.CheckpointInfo) -> Table:
  cfg = info.config
  if info.architecture == "flashvl":
    return flashvl_weights.composite_table(cfg, vision_table(cfg.vision, info.hf_layout))
  if info.architecture == "qwen2":
    return qwen2_weights.table(cfg)
  return vision_table(cfg, info.hf_layout)


def _vision_hf_config(cfg: VisionConfig, layout: Mapping[str, str], dtype: str) -> dict[str, Any]:
  weights = checkpoint.VISION_WEIGHTS[cfg.kind]
  if cfg.kind == "aimv2":
    return weights.hf_config_from(cfg, layout.get("vision", "transformers"), dtype=dtype)
  return weights.hf_config_from(cfg, dtype=dtype)


def _overlay(source: Mapping[str, Any] | None, ours: Mapping[str, Any], dtype: str) -> dict[str, Any]:
  """`ours` over the source config (one level deep for nested configs); every dtype field set to `dtype`."""
  merged = dict(source or {})
  for key, value in ours.items():
    if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
      value = _overlay(merged[key], value, dtype)
    merged[key] = value
  for key in DTYPE_KEYS:
    if key in merged:
      merged[key] = dtype
  return merged


def _carried_head(cfg: VisionConfig, carried_keys: list[str]) -> dict[str, Any]:
  """A SigLIP head Flash-VL does not use but carries is declared, so that transformers loads it."""
  return {"vision_use_head": any(k.startswith("vit.head.") for k in carried_keys)} if cfg.kind == "siglip" else {}


def hf_config(info: checkpoint.CheckpointInfo, dtype: str) -> dict[str, Any]:
  """config.json for the exported checkpoint."""
  cfg, layout = info.config, info.hf_layout
  if info.architecture == "qwen2":
    ours = qwen2_weights.hf_config_from(cfg, dtype=dtype)
  elif info.architecture == "flashvl":
    ours = {
        "architectures": ["FlashVL"],
        "model_type": "flashvl",
        "vision_config": {**_vision_hf_config(cfg.vision, layout, dtype), "proj_output_dim": cfg.llm.hidden_size,
                          **_carried_head(cfg.vision, info.metadata.get("carried_keys") or [])},
        "llm_config": qwen2_weights.hf_config_from(cfg.llm, dtype=dtype),
        "intermediate_size": cfg.adapter.intermediate_size if cfg.adapter.kind == "ln_mlp3" else None,
        "image_token_num": info.metadata.get("image_token_num") or max_image_tokens(cfg),
        "torch_dtype": dtype,
    }
  else:
    ours = _vision_hf_config(cfg, layout, dtype)
  return _overlay(info.metadata.get("hf_config"), ours, dtype)


def _step_bytes(step: ExportStep, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> int:
  """Bytes of the HF tensor `step` writes (one layer's slice of a stacked leaf)."""
  return sum(sizes[p] // (shapes[p][0] if step.index is not None else 1) for p in step.our_paths)


def _shards(plan: list[ExportStep], nbytes_of, max_bytes: int) -> list[list[ExportStep]]:
  """The export plan cut into consecutive groups of at most `max_bytes` (a larger tensor gets its own)."""
  shards, current, current_bytes = [], [], 0
  for entry in plan:
    nbytes = nbytes_of(entry)
    if current and current_bytes + nbytes > max_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(entry)
    current_bytes += nbytes
  return shards + [current] if current else shards


def _restore_subset(info: checkpoint.CheckpointInfo, state: nnx.State, paths: set[str], dtype: str) -> dict[str, Any]:
  """Only `paths` of the checkpoint's params, on the host CPU in `dtype` (the rest stays on disk)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  flat = checkpoint.flat_params(state)
  target: dict = {}
  for name, (keys, value) in flat.items():
    leaf = jax.ShapeDtypeStruct(value.shape, dtype, sharding=cpu) if name in paths else ocp.PLACEHOLDER
    checkpoint.set_nested(target, keys, leaf)
  restored = ocp.load(info.path / checkpoint.PARAMS_DIR, target)
  return {name: restored_leaf for name, restored_leaf in checkpoint.flatten_tree(restored).items() if name in paths}


def is_hf_export(path: pathlib.Path) -> bool:
  return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def check_export_destination(out: str | pathlib.Path, *, overwrite: bool = False) -> None:
  checkpoint.check_destination(out, overwrite=overwrite, is_complete=is_hf_export, what="Hugging Face checkpoint")


@dataclasses.dataclass
class ExportSource:
  """What export reads: the checkpoint's description, its parameters' shapes, a reader of some of them (in a
  dtype), the carried tensors and the files copied alongside."""

  info: checkpoint.CheckpointInfo
  state: nnx.State
  read: Callable[[set[str], str], dict[str, Any]]
  carried: dict[str, np.ndarray]
  files: list[pathlib.Path]


def saved_source(ckpt: str | pathlib.Path) -> ExportSource:
  """A model checkpoint, read from disk a few tensors at a time."""
  info = checkpoint.read_info(ckpt)
  module = checkpoint.abstract_module(info.architecture, info.config, info.param_dtype)
  checkpoint.check_loadable(info.path, module)
  state = nnx.state(module, nnx.Param)
  return ExportSource(info, state, lambda paths, dtype: _restore_subset(info, state, paths, dtype),
                      checkpoint.carried_of(info.path), checkpoint.aux_files(info.path))


def training_step_source(step_dir: str | pathlib.Path) -> ExportSource:
  """A training checkpoint step: its parameters restored into memory (`step_model`), LoRA merged."""
  step_dir = pathlib.Path(step_dir).absolute()
  module, source = step_model.load_step_model(step_dir)
  state = nnx.state(module, nnx.Param)
  flat = {name: value for name, (_, value) in checkpoint.flat_params(state).items()}
  dtypes = {np.dtype(v.dtype).name for v in flat.values()}
  metadata = {**source, "param_dtype": dtypes.pop() if len(dtypes) == 1 else "float32"}
  info = checkpoint.CheckpointInfo(step_dir, "flashvl", module.config, metadata)
  read = lambda paths, dtype: {p: np.asarray(flat[p]).astype(dtype) for p in paths}
  return ExportSource(info, state, read, step_model.run_carried(step_model.run_directory(step_dir)), [])


def export_checkpoint(ckpt: str | pathlib.Path, out: str | pathlib.Path, *, dtype: str | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                      progress: bool = True) -> pathlib.Path:
  """Writes the model checkpoint (or training checkpoint step) at `ckpt` to `out` as HF safetensors (one file,
  or shards + index) and config.json; carried tensors (e.g. a released Flash-VL's SigLIP head) go in the last.

  dtype: tensor dtype to write (default: as stored). Holds one shard of tensors in memory (plus ~`CHUNK_BYTES` on
  their way from Orbax): lower `max_shard_bytes` to use less. A training step is restored into memory whole.
  """
  check_export_destination(out, overwrite=overwrite)
  source = training_step_source(ckpt) if step_model.is_training_step(ckpt) else saved_source(ckpt)
  info, state = source.info, source.state
  dtype = dtype or info.param_dtype
  shapes = param_shapes(state)
  sizes = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize for name, shape in shapes.items()}
  plan = export_table(info).plan_export(shapes)
  nbytes_of = lambda step: _step_bytes(step, sizes, shapes)
  shards = _shards(plan, nbytes_of, max_shard_bytes)
  names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                  for i in range(len(shards))]
  carried = {key: checkpoint.cast_float(value, dtype) for key, value in source.carried.items()}
  total = sum(sizes.values()) + sum(t.nbytes for t in carried.values())
  weight_map, written = {}, 0
  with checkpoint.staged_directory(out, overwrite=overwrite, is_complete=is_hf_export,
                                   what="Hugging Face checkpoint") as staging, \
       progress_bar(total, f"export -> {pathlib.Path(out).name}", progress) as bar:
    for name, shard in zip(names, shards):
      tensors = {}
      for group in _shards(shard, nbytes_of, checkpoint.CHUNK_BYTES):  # restored a little at a time
        arrays = source.read({p for step in group for p in step.our_paths}, dtype)
        converted = dict(run_export(group, lambda path: np.asarray(arrays[path])))
        del arrays
        tensors.update(converted)
        written += len(converted)
        bar.update(sum(t.nbytes for t in converted.values()))
        bar.set_postfix_str(f"{written}/{len(plan)} tensors")
      if name == names[-1]:
        tensors.update(carried)
        bar.update(sum(t.nbytes for t in carried.values()))
      integrity.storage_errors(lambda: save_file(tensors, str(staging / name), metadata={"format": "pt"}), out,
                               "export destination")
      weight_map.update({key: name for key in tensors})
      del tensors
    if len(names) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (staging / "config.json").write_text(json.dumps(hf_config(info, dtype), indent=2))
    for f in source.files:
      shutil.copy2(f, staging / f.name)
  return pathlib.Path(out)


__all__ = ["export_checkpoint", "export_table", "hf_config", "vision_table"]
