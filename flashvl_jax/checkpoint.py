"""Model checkpoints: one Orbax layout for converted, assembled and trained models, restored into any mesh.

A model checkpoint is a directory:

  metadata.json   what it holds: {"format": "flashvl_jax.model", "format_version": 2, "architecture", "param_dtype",
                  "num_params", "hf_layout", ...} (see `write_descriptors` for the keys)
  config.yaml     our config (`config.to_dict`): a FlashVLConfig, or a VisionConfig / LLMConfig for a component
  params/         an Orbax PyTree of every `nnx.Param`, nested like the module (`nnx.to_pure_dict`); per-layer
                  parameters are stacked: `llm.model.layers.mlp.up_proj.kernel` is [L, in, out]
  tokenizer.json, ...   tokenizer / processor files copied from the source, when it had them
  carried.safetensors   source tensors our model does not use (a released Flash-VL's SigLIP head `vit.head.*`),
                  kept as they were so that `convert export` writes every key of the source back
  checksums.json  size and CRC-32 of every other file (`integrity`), verified by every load and `convert inspect`

`save_model` writes one from a live module (any mesh, any number of processes); `write_model` streams one in
tensor by tensor (the Hugging Face converter). Both write into a temporary sibling `<dir>.incomplete` and rename
it at the end, so an interrupted write never leaves a directory that loads. `load_model` / `load_module` restore
straight into the shardings `sharding.RULES` give on a mesh, without first building the model on one device; they
also accept a Hugging Face directory (converted on the fly). A training checkpoint step is exported with
`convert export` (`flashvl_jax.train.step_model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import socket
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from flashvl_jax import integrity, sharding
from flashvl_jax.config import FlashVLConfig, LLMConfig, TilingConfig, VisionConfig, from_dict, to_dict
from flashvl_jax.errors import PathExistsError
from flashvl_jax.models.aimv2 import Aimv2VisionTower
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.qwen2 import Qwen2ForCausalLM
from flashvl_jax.models.siglip import SiglipVisionTower
from flashvl_jax.weights import aimv2 as aimv2_weights
from flashvl_jax.weights import flashvl as flashvl_weights
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights import siglip as siglip_weights
from flashvl_jax.weights.hf_io import (CheckpointError, SafetensorsReader, detect_architecture, load_hf_module,
                                       param_shapes, read_hf_config)
from flashvl_jax.weights.mapping import Table, WeightMappingError

FORMAT = "flashvl_jax.model"
FORMAT_VERSION = 2  # 2: per-layer parameters stacked on a leading layer axis (1: one subtree per layer)
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
CARRIED_FILE = "carried.safetensors"
STAGING_SUFFIX = ".incomplete"
WRITER_FILE = ".writer.json"  # in a staging directory only: who is writing it
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json")
AUX_FILES = TOKENIZER_FILES + ("generation_config.json", "preprocessor_config.json")
DEFAULT_TOKENIZER = "qwen2.5"
CHUNK_BYTES = 256 << 20  # `write_model` hands Orbax this much at a time
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
PARAM_DTYPES = ("float32", "bfloat16", "float16")
VISION_WEIGHTS = flashvl_weights.VISION_WEIGHTS


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One kind of model a checkpoint can hold: its config dataclass and its NNX module."""

  config_type: type
  module_type: type

  def build(self, cfg: Any, dtype: str | None, rngs: nnx.Rngs) -> nnx.Module:
    """The module for `cfg` with parameters (and compute) in `dtype`; `None` keeps a FlashVLConfig's policy."""
    if self.module_type is FlashVLModel:
      if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
      return FlashVLModel(cfg, rngs=rngs)
    return self.module_type(cfg, dtype=dtype, param_dtype=dtype, rngs=rngs)


ARCHITECTURES = {
    "flashvl": Architecture(FlashVLConfig, FlashVLModel),
    "siglip": Architecture(VisionConfig, SiglipVisionTower),
    "aimv2": Architecture(VisionConfig, Aimv2VisionTower),
    "qwen2": Architecture(LLMConfig, Qwen2ForCausalLM),
}


def architecture_of(module: nnx.Module) -> str:
  for name, arch in ARCHITECTURES.items():
    if isinstance(module, arch.module_type):
      return name
  raise TypeError(f"{type(module).__name__} is not a checkpointable model; expected one of "
                  f"{', '.join(a.module_type.__name__ for a in ARCHITECTURES.values())}")


def module_config(module: nnx.Module) -> Any:
  """The config a module was built from (`.config` on the LM and the composite, `.cfg` on the towers)."""
  return module.config if hasattr(module, "config") else module.cfg


def abstract_module(architecture: str, cfg: Any, dtype: str | None) -> nnx.Module:
  """The module's structure, shapes and dtypes without allocating or initialising anything."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: ARCHITECTURES[architecture].build(cfg, dtype, nnx.Rngs(0)))


def flat_params(module_or_state: Any) -> dict[str, tuple[tuple[Any, ...], Any]]:
  """Dotted path ('llm.model.layers.0.mlp.up_proj.kernel') -> (the key tuple in the nested params tree, value)."""
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
  return {".".join(map(str, path)): (tuple(path), var.get_value()) for path, var in nnx.to_flat_state(state)}


def flatten_tree(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
  """A nested mapping (e.g. Orbax metadata) as dotted path -> leaf."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    out.update(flatten_tree(value, f"{name}.") if isinstance(value, Mapping) else {name: value})
  return out


def set_nested(tree: dict, keys: tuple[Any, ...], value: Any) -> None:
  """`tree[k0][k1]...[kn] = value`, creating the intermediate dicts."""
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = value


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face directories


def vision_layout(vision_keys: Iterable[str]) -> dict[str, str]:
  """How a vision tower's keys are spelled, so export can write them the same way.

  'vision': 'apple' (Apple's remote-code AIMv2: `preprocessor.*`, `trunk.*`) or 'transformers';
  'vision_prefix': 'vision_model.' (a SiglipModel / Aimv2Model, or a transformers-4 SiglipVisionModel) or ''.
  """
  keys = list(vision_keys)
  apple = any(k.startswith(aimv2_weights.APPLE_PREFIXES) for k in keys)
  prefixed = any(k.startswith(siglip_weights.VISION_PREFIX) for k in keys)
  return {"vision": "apple" if apple else "transformers",
          "vision_prefix": siglip_weights.VISION_PREFIX if prefixed else ""}


@dataclasses.dataclass
class HFCheckpoint:
  """A Hugging Face checkpoint directory, understood: which model it holds and how its keys map onto ours."""

  path: pathlib.Path
  hf_config: dict[str, Any]
  architecture: str
  config: Any  # FlashVLConfig, VisionConfig or LLMConfig
  layout: dict[str, str]  # `vision_layout` of the vision keys ({} for Qwen2)
  reader: SafetensorsReader
  table: Table

  @property
  def mapped_keys(self) -> list[str]:
    """Checkpoint keys that become parameters (not knowingly dropped ones such as a SiglipModel's text tower)."""
    return [k for k in self.reader.keys() if (m := self.table.match_hf(k)) is not None and m[0].ours is not None]

  @property
  def unused_keys(self) -> list[str]:
    return [k for k in self.reader.keys() if (m := self.table.match_hf(k)) is not None and m[0].ours is None]

  @property
  def carried_keys(self) -> list[str]:
    """Unused tensors kept in `CARRIED_FILE` and written back by export: all of a released Flash-VL's. A
    component's unused tensors (a SiglipModel's text tower) are dropped: it is exported as a vision model."""
    return self.unused_keys if self.architecture == "flashvl" else []

  @property
  def dropped_keys(self) -> list[str]:
    carried = set(self.carried_keys)
    return [k for k in self.unused_keys if k not in carried]

  def carried_tensors(self, dtype: str) -> dict[str, np.ndarray]:
    """The carried tensors, floating-point ones cast to `dtype` (the checkpoint's parameter dtype)."""
    return {k: cast_float(self.reader.get(k), dtype) for k in self.carried_keys}

  @property
  def source_dtype(self) -> str:
    """The dtype of the mapped tensors ('bfloat16', 'float32', ...), or 'mixed'."""
    dtypes = {SAFETENSORS_DTYPES.get(self.reader.dtype(k), self.reader.dtype(k)) for k in self.mapped_keys}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"

  @property
  def default_param_dtype(self) -> str:
    """The source dtype when our models can hold it (bf16 stays bf16), else float32."""
    return self.source_dtype if self.source_dtype in PARAM_DTYPES else "float32"

  def metadata(self) -> dict[str, Any]:
    """What `metadata.json` records about this source (see `write_descriptors`)."""
    meta: dict[str, Any] = {"source": str(self.path), "source_dtype": self.source_dtype, "hf_layout": self.layout,
                            "dropped_keys": self.dropped_keys, "carried_keys": self.carried_keys}
    llm = self.config.llm if self.architecture == "flashvl" else self.config
    if isinstance(llm, LLMConfig):
      meta["tied"] = llm.tie_word_embeddings
    if self.architecture == "flashvl":
      meta["image_token_num"] = self.hf_config.get("image_token_num")
    # Export writes the source config.json back (keeping e.g. remote-code `auto_map`), except a SiglipModel's or
    # Aimv2Model's: only their vision tower is kept, which export writes as a vision model.
    if "vision_config" not in self.hf_config or self.architecture == "flashvl":
      meta["hf_config"] = self.hf_config
    return meta


def _check_float_tensors(hf: HFCheckpoint) -> None:
  bad = [f"{k} has dtype {hf.reader.dtype(k)}" for k in hf.mapped_keys if hf.reader.dtype(k) not in SAFETENSORS_DTYPES]
  if bad:
    raise WeightMappingError(f"{hf.path}: {len(bad)} parameter tensors are not floating point:\n" +
                             "\n".join(f"  {x}" for x in bad))


def open_hf(path: str | pathlib.Path, *, tiling: TilingConfig | None = None) -> HFCheckpoint:
  """Reads config.json and the safetensors headers of an HF directory (no tensor data) and picks the table.

  Raises `CheckpointError` for a missing directory, config or weights and an unknown architecture,
  `ConfigError` for unsupported settings, `WeightMappingError` for non-float parameter tensors.
  """
  path = pathlib.Path(path)
  hf = read_hf_config(path)
  architecture = detect_architecture(hf, where=str(path / "config.json"))
  reader = SafetensorsReader(path)
  keys = reader.keys()
  if architecture == "flashvl":
    cfg = flashvl_weights.config_from_hf(hf, reader.shapes(), tiling)
    table = flashvl_weights.table(cfg, keys)
    qwen2_weights.check_tied_lm_head(reader, cfg.llm, hf_prefix="llm.")
    layout = vision_layout(k[len("vit."):] for k in keys if k.startswith("vit."))
  elif architecture == "qwen2":
    cfg = qwen2_weights.config_from_hf(hf)
    table = qwen2_weights.table(cfg)
    qwen2_weights.check_tied_lm_head(reader, cfg)
    layout = {}
  else:
    weights = VISION_WEIGHTS[architecture]
    cfg = weights.config_from_hf(hf)
    table = weights.checkpoint_table(cfg, keys)
    layout = vision_layout(keys)
  checkpoint = HFCheckpoint(path, hf, architecture, cfg, layout, reader, table)
  _check_float_tensors(checkpoint)
  return checkpoint


def is_hf_directory(path: pathlib.Path) -> bool:
  return (path / "config.json").is_file() and not (path / METADATA_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _is_primary() -> bool:
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def is_model_checkpoint(path: str | pathlib.Path) -> bool:
  """A complete checkpoint written by `save_model` / `write_model` (not a staging directory)."""
  path = pathlib.Path(path)
  return ((path / METADATA_FILE).is_file() and (path / PARAMS_DIR).is_dir() and
          not (path / WRITER_FILE).exists())


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _reclaim_staging(staging: pathlib.Path) -> None:
  """Removes a staging directory left by an interrupted write, or refuses if it may still be in use."""
  writer_file = staging / WRITER_FILE
  if not writer_file.is_file():
    raise PathExistsError(f"{staging} exists but was not created by flashvl_jax; remove it and run again")
  writer = json.loads(writer_file.read_text())
  if writer.get("host") != socket.gethostname():
    raise PathExistsError(f"{staging} is being written (or was left) by process {writer.get('pid')} on host "
                          f"{writer.get('host')!r}; if no conversion is running there, remove it and run again")
  if writer.get("pid") != os.getpid() and _pid_alive(int(writer.get("pid", -1))):
    raise PathExistsError(f"{staging} is being written by process {writer['pid']} (still running); wait for it or "
                          f"stop it, then run again")
  shutil.rmtree(staging)


def check_destination(path: str | pathlib.Path, *, overwrite: bool = False,
                      is_complete: Callable[[pathlib.Path], bool] = is_model_checkpoint,
                      what: str = "checkpoint") -> None:
  """Raises PathExistsError unless `staged_directory(path, ...)` may write there (called early by the commands, so a
  refused destination costs no reading)."""
  path = pathlib.Path(path).absolute()
  if path.exists() and not (path.is_dir() and not any(path.iterdir())):
    if not is_complete(path):
      raise PathExistsError(f"{path} exists and is not a {what}; choose another destination or remove it")
    if not overwrite:
      raise PathExistsError(f"{path} already holds a complete {what}; pass --overwrite (overwrite=True) to "
                            "replace it")


@contextlib.contextmanager
def staged_directory(path: str | pathlib.Path, *, overwrite: bool = False,
                     is_complete: Callable[[pathlib.Path], bool] = is_model_checkpoint,
                     what: str = "checkpoint") -> Iterator[pathlib.Path]:
  """Yields `<path>.incomplete` to write into; renames it to `path` when the block succeeds.

  An existing complete `path` is replaced only with `overwrite`; anything else already at `path` (other than an
  empty directory) is refused. A staging directory left by a killed run is removed and rewritten; one that another
  live process is writing is refused. If the block raises, the staging directory is deleted.
  """
  path = pathlib.Path(path).absolute()
  staging = path.with_name(path.name + STAGING_SUFFIX)
  if _is_primary():
    check_destination(path, overwrite=overwrite, is_complete=is_complete, what=what)
    if staging.exists():
      _reclaim_staging(staging)
    staging.mkdir(parents=True)
    (staging / WRITER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
  _barrier(f"flashvl_jax staging {path}")
  try:
    yield staging
  except BaseException:
    if _is_primary():
      shutil.rmtree(staging, ignore_errors=True)
    raise
  _barrier(f"flashvl_jax written {path}")
  if _is_primary():
    (staging / WRITER_FILE).unlink()
    if path.exists():
      replaced = path.with_name(path.name + ".replaced")
      shutil.rmtree(replaced, ignore_errors=True)
      path.rename(replaced)
      staging.rename(path)
      shutil.rmtree(replaced)
    else:
      staging.rename(path)
  _barrier(f"flashvl_jax renamed {path}")


def _dtype_name(arrays: Iterable[Any]) -> str:
  names = {np.dtype(a.dtype).name for a in arrays}
  return names.pop() if len(names) == 1 else "float32"


def cast_float(array: np.ndarray, dtype: str) -> np.ndarray:
  return array.astype(dtype) if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16" else array


def write_descriptors(directory: pathlib.Path, architecture: str, config: Any, *, param_dtype: str, num_params: int,
                      metadata: Mapping[str, Any] | None = None, files: Iterable[pathlib.Path] = (),
                      carried: Mapping[str, np.ndarray] | None = None) -> None:
  """config.yaml, the copied `files`, the `carried` tensors (`CARRIED_FILE`), checksums.json (over everything so
  far, params/ included), then metadata.json (last: it marks the directory as a checkpoint).

  metadata.json always holds format, format_version, architecture, param_dtype and num_params; `metadata` adds
  e.g. source, source_dtype, hf_layout (`vision_layout`), tied, image_token_num, dropped_keys and hf_config (the
  source config.json, which export writes back with our sizes), or a trainer's step.
  """
  if not _is_primary():
    return
  (directory / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
  for f in files:
    shutil.copy2(f, directory / pathlib.Path(f).name)
  if carried:
    integrity.storage_errors(lambda: save_file(dict(carried), str(directory / CARRIED_FILE)), directory,
                             "model checkpoint")
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture,
          "param_dtype": param_dtype, "num_params": num_params, **(metadata or {})}
  integrity.write_manifest(directory, skip=(METADATA_FILE, WRITER_FILE))
  (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))


def aux_files(directory: str | pathlib.Path) -> list[pathlib.Path]:
  """The tokenizer / processor files (`AUX_FILES`) and remote-code `*.py` files present in `directory`."""
  directory = pathlib.Path(directory)
  found = [directory / name for name in AUX_FILES if (directory / name).is_file()]
  return found + sorted(directory.glob("*.py"))


def carried_of(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The carried tensors of a model checkpoint, or of an HF directory, as stored ({} when there are none)."""
  path = pathlib.Path(path)
  if is_hf_directory(path):
    hf = open_hf(path)
    return {k: hf.reader.get(k) for k in hf.carried_keys}
  carried = resolve_checkpoint(path) / CARRIED_FILE
  return load_file(str(carried)) if carried.is_file() else {}


def save_model(path: str | pathlib.Path, model: nnx.Module, *, metadata: Mapping[str, Any] | None = None,
               files: Iterable[pathlib.Path] = (), carried: Mapping[str, np.ndarray] | None = None,
               overwrite: bool = False) -> pathlib.Path:
  """Writes `model` (FlashVLModel, a vision tower or Qwen2ForCausalLM) as a model checkpoint at `path`.

  The one way to write model parameters: `convert export` and `load_model` read what it writes. Parameters may
  be sharded over any mesh and processes (every process must call this); they are saved as they are (dtype
  included). `metadata` is merged into metadata.json (e.g. {"step": 1000} or a converted source's
  `hf_layout`, so export writes the source's key layout back); `files` (e.g. `aux_files(source)`) are copied in;
  `carried` (e.g. `carried_of(source)`) are the source's unused tensors, for export.
  """
  architecture = architecture_of(model)
  params = nnx.state(model, nnx.Param)
  arrays = [v for _, (_, v) in flat_params(params).items()]
  with staged_directory(path, overwrite=overwrite) as staging:
    integrity.storage_errors(lambda: ocp.save(staging / PARAMS_DIR, nnx.to_pure_dict(params)), path,
                             "model checkpoint")
    write_descriptors(staging, architecture, module_config(model), param_dtype=_dtype_name(arrays),
                      num_params=sum(int(np.prod(a.shape)) for a in arrays), metadata=metadata, files=files,
                      carried=carried)
  return pathlib.Path(path)


def uncompressed_context() -> ocp.Context:
  """An Orbax context that writes arrays without zstd: zstd keeps buffers of the size of what it compressed (three
  770 MB leaves written in turn peaked at 2.65 GB with it, 1.80 GB without) and weights compress little."""
  context = ocp.Context()
  context.array.saving.use_compression = False
  return context


def write_model(path: str | pathlib.Path, module: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], *,
                metadata: Mapping[str, Any] | None = None, files: Iterable[pathlib.Path] = (),
                carried: Mapping[str, np.ndarray] | None = None, overwrite: bool = False,
                progress: Any = None) -> pathlib.Path:
  """Writes a model checkpoint whose parameters arrive one tensor at a time, holding at most ~`CHUNK_BYTES`.

  module: the abstract module (`abstract_module`) the tensors fill; it gives the config, the nested keys and
    each parameter's dtype (tensors are cast to it).
  tensors: (dotted path, array) pairs, e.g. `mapping.run_import` over a safetensors reader; each parameter
    exactly once.
  carried: source tensors the model does not use, kept for export (`CARRIED_FILE`).
  progress: a tqdm bar, advanced by each tensor's bytes.
  """
  expected = flat_params(module)
  written: set[str] = set()
  with staged_directory(path, overwrite=overwrite) as staging, uncompressed_context():
    params_dir = staging / PARAMS_DIR
    chunk: dict = {}
    chunk_bytes = 0
    for name, array in tensors:
      if name not in expected:
        raise WeightMappingError(f"tensor for {name}, which the model does not have")
      if name in written:
        raise WeightMappingError(f"{name} was written twice")
      keys, abstract = expected[name]
      if tuple(array.shape) != tuple(abstract.shape):
        raise WeightMappingError(f"{name}: got shape {tuple(array.shape)}, the model expects {tuple(abstract.shape)}")
      # A CPU jax.Array over the same memory (device_put does not copy an aligned host array): Orbax writes it
      # with one staging copy, where a numpy leaf costs two (a stacked [28, 1536, 8960] bf16 MLP kernel is 770 MB).
      array = jax.device_put(np.asarray(array, dtype=abstract.dtype), jax.local_devices(backend="cpu")[0])
      set_nested(chunk, keys, array)
      written.add(name)
      chunk_bytes += array.nbytes
      if progress is not None:
        progress.update(array.nbytes)
        progress.set_postfix_str(f"{len(written)}/{len(expected)} tensors")
      if chunk_bytes >= CHUNK_BYTES:
        integrity.storage_errors(lambda: ocp.partial.save(params_dir, chunk), path, "model checkpoint")
        chunk, chunk_bytes = {}, 0
    missing = sorted(set(expected) - written)
    if missing:
      raise WeightMappingError(f"{len(missing)} parameters were never written:\n" +
                               "\n".join(f"  {m}" for m in missing))
    if chunk:
      integrity.storage_errors(lambda: ocp.partial.save(params_dir, chunk), path, "model checkpoint")
    integrity.storage_errors(lambda: ocp.partial.finalize(params_dir), path, "model checkpoint")
    arrays = [v for _, v in expected.values()]
    write_descriptors(staging, architecture_of(module), module_config(module), param_dtype=_dtype_name(arrays),
                      num_params=sum(int(np.prod(a.shape)) for a in arrays), metadata=metadata, files=files,
                      carried=carried)
  return pathlib.Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A model checkpoint's metadata.json and config (or, for an HF directory, what `open_hf` found)."""

  path: pathlib.Path
  architecture: str
  config: Any
  metadata: dict[str, Any]

  @property
  def param_dtype(self) -> str:
    return self.metadata["param_dtype"]

  @property
  def hf_layout(self) -> dict[str, str]:
    return self.metadata.get("hf_layout") or {}


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
  """`path` (made absolute: Orbax needs that), checked to be a complete model checkpoint."""
  path = pathlib.Path(path).absolute()
  if path.name.endswith(STAGING_SUFFIX) or (path / WRITER_FILE).exists():
    raise CheckpointError(f"{path} is an incomplete checkpoint (its write was interrupted); rerun the conversion "
                          "or save that produced it")
  if not path.exists():
    if path.with_name(path.name + STAGING_SUFFIX).exists():
      raise CheckpointError(f"{path} was never completed ({path.name}{STAGING_SUFFIX} is still there); rerun the "
                            "conversion or save that writes it")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
  if is_model_checkpoint(path):
    return path
  if (path / "state").is_dir() and (path.parent.parent / CONFIG_FILE).is_file():
    raise CheckpointError(f"{path} is a training checkpoint step (optimizer state included), not a model "
                          f"checkpoint: export it with `python -m convert export {path} --out DIR`, or use the run's "
                          f"final model, {path.parent.parent / 'model'}")
  raise CheckpointError(f"{path} is not a model checkpoint: expected {METADATA_FILE} and {PARAMS_DIR}/ (written by "
                        "`python -m convert` or checkpoint.save_model), or a Hugging Face directory with config.json")


def read_info(path: str | pathlib.Path) -> CheckpointInfo:
  """Metadata and config of a model checkpoint."""
  path = resolve_checkpoint(path)
  try:
    meta = json.loads((path / METADATA_FILE).read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path / METADATA_FILE} is not valid JSON: {e}") from None
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{path / METADATA_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
  if int(meta.get("format_version", 0)) < FORMAT_VERSION:
    raise CheckpointError(
        f"{path} has format_version {meta.get('format_version')}: one parameter subtree per layer, written before "
        f"flashvl_jax stacked its layers (format {FORMAT_VERSION}). Re-convert it from the Hugging Face checkpoint "
        f"with `python -m convert hf SRC {path} --overwrite`; a trained one can be exported to Hugging Face with the "
        "flashvl_jax that wrote it (`python -m convert export`) and converted back with this one")
  if int(meta.get("format_version", 0)) > FORMAT_VERSION:
    raise CheckpointError(f"{path} has format_version {meta['format_version']}; this flashvl_jax reads up to "
                          f"{FORMAT_VERSION}: upgrade flashvl_jax")
  architecture = meta.get("architecture")
  if architecture not in ARCHITECTURES:
    raise CheckpointError(f"{path / METADATA_FILE}: unknown architecture {architecture!r}; expected one of "
                          f"{', '.join(ARCHITECTURES)}")
  config = from_dict(ARCHITECTURES[architecture].config_type, yaml.safe_load((path / CONFIG_FILE).read_text()) or {})
  return CheckpointInfo(path, architecture, config, meta)


def data_check(path: str | pathlib.Path) -> str:
  """'ok (N MB read, checksums match)' for a checkpoint whose every file matches checksums.json; raises
  `integrity.CorruptCheckpointError` otherwise. Reads every byte."""
  path = resolve_checkpoint(path)
  if not integrity.has_manifest(path):
    return f"not possible: no {integrity.MANIFEST_FILE} (written before flashvl_jax recorded checksums)"
  return f"ok ({integrity.verify_manifest(path) / 1e6:,.1f} MB read, checksums match)"


def read_config(path: str | pathlib.Path) -> Any:
  """The config of a model checkpoint or HF directory, without reading tensors."""
  return open_hf(path).config if is_hf_directory(pathlib.Path(path)) else read_info(path).config


def saved_params(path: str | pathlib.Path) -> dict[str, Any]:
  """Dotted path -> Orbax leaf metadata (shape, dtype) of a model checkpoint's params, without reading them."""
  return flatten_tree(ocp.metadata(pathlib.Path(path) / PARAMS_DIR).metadata)


def check_saved_params(path: pathlib.Path, module: nnx.Module) -> None:
  """Raises `WeightMappingError` listing every missing, unexpected or mis-shaped parameter."""
  saved = saved_params(path)
  expected = param_shapes(module)
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  mismatched = [f"{k}: checkpoint {tuple(saved[k].shape)}, model {expected[k]}"
                for k in sorted(set(saved) & set(expected)) if tuple(saved[k].shape) != expected[k]]
  if missing or unexpected or mismatched:
    lines = [f"{path} does not match its config.yaml:"]
    for title, items in (("missing parameters", missing), ("unexpected parameters", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines += [f"  {len(items)} {title}:"] + [f"    {x}" for x in items]
    raise WeightMappingError("\n".join(lines))


def check_loadable(path: pathlib.Path, module: nnx.Module) -> None:
  """Before reading parameters: names and shapes match `module`, and every file matches its checksum (reads every
  byte; checkpoints written before checksums were recorded have none to check)."""
  check_saved_params(path, module)
  if integrity.has_manifest(path):
    integrity.verify_manifest(path)


def restore_target(state: nnx.State, mesh: jax.sharding.Mesh | None, dtype: str | None = None) -> dict:
  """The abstract params tree to restore into: each leaf's shape, dtype (or `dtype`) and sharding by the rules
  (one device when `mesh` is None)."""
  abstract = nnx.to_pure_dict(state)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
  return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype or v.dtype, sharding=s), abstract, shardings)


def _expect_architecture(found: str, expected: str | None, path: pathlib.Path) -> None:
  if expected is not None and found != expected:
    hint = (" Build a Flash-VL from a vision and an LLM checkpoint with `python -m convert assemble --vision V "
            "--llm L --out DST`." if expected == "flashvl" else "")
    raise CheckpointError(f"{path} holds a {found!r} model, not {expected!r}.{hint}")


def load_module(path: str | pathlib.Path, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                architecture: str | None = None) -> tuple[nnx.Module, CheckpointInfo]:
  """Any model checkpoint (or HF directory, converted on the fly) as its module, placed on `mesh`.

  dtype: parameter dtype to cast to at restore ('bfloat16', 'float32'); default as stored (a FlashVLConfig's
    compute dtype follows it when given). mesh: parameters go straight into the shardings `sharding.RULES` give
    there (default: the first device). architecture: refuse anything else (before reading tensors).
  """
  path = pathlib.Path(path)
  if is_hf_directory(path):
    hf = open_hf(path)
    _expect_architecture(hf.architecture, architecture, path)
    dtype = dtype or hf.default_param_dtype
    module = load_hf_module(lambda: ARCHITECTURES[hf.architecture].build(hf.config, dtype, nnx.Rngs(0)), hf.table,
                            hf.reader, what=f"checkpoint {path}", mesh=mesh)
    return module, CheckpointInfo(path, hf.architecture, module_config(module), {**hf.metadata(), "param_dtype": dtype})
  info = read_info(path)
  _expect_architecture(info.architecture, architecture, path)
  module = abstract_module(info.architecture, info.config,
                           dtype if dtype or info.architecture == "flashvl" else info.param_dtype)
  check_loadable(info.path, module)
  graphdef, state = nnx.split(module)
  restored = ocp.load(info.path / PARAMS_DIR, restore_target(state, mesh))
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), info


def tokenizer_source(directory: str | pathlib.Path) -> str:
  """`directory` if it holds a tokenizer (tokenizer.json, or vocab.json + merges.txt), else 'qwen2.5'."""
  directory = pathlib.Path(directory)
  if (directory / "tokenizer.json").is_file() or all((directory / f).is_file() for f in ("vocab.json", "merges.txt")):
    return str(directory)
  return DEFAULT_TOKENIZER


def load_model(path: str | pathlib.Path, *, dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[FlashVLModel, str]:
  """(FlashVLModel, tokenizer source) from a Flash-VL model checkpoint or HF directory.

  See `load_module` for `dtype` and `mesh`; the tokenizer source is the checkpoint directory when it holds
  tokenizer files, else 'qwen2.5' (`preprocess.tokenizer.load_tokenizer` reads either).
  """
  module, info = load_module(path, dtype=dtype, mesh=mesh, architecture="flashvl")
  return module, tokenizer_source(info.path)


__all__ = [
    "ARCHITECTURES", "CheckpointInfo", "HFCheckpoint", "abstract_module", "aux_files", "carried_of", "check_destination",
    "check_loadable", "data_check", "is_model_checkpoint", "load_model", "load_module", "open_hf", "read_config",
    "read_info", "resolve_checkpoint", "save_model", "staged_directory", "tokenizer_source", "write_model"
]
