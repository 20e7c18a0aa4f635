"""Reading Hugging Face checkpoint directories and moving tensors in and out of NNX modules."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from flashvl_jax.errors import UserError
from flashvl_jax.sharding import state_shardings
from flashvl_jax.weights.mapping import Table, WeightMappingError, run_import

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(UserError, FileNotFoundError):
  """A checkpoint directory is missing or has no usable weights/config."""


def read_hf_config(path: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
  cfg = path / "config.json"
  if not cfg.is_file():
    raise CheckpointError(f"{str(path)!r} has no config.json; is it a Hugging Face checkpoint directory?")
  try:
    return json.loads(cfg.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None


def hf_value(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
  """The first of `names` present in an HF config dict (e.g. 'rope_theta' or a transformers-5 spelling)."""
  for n in names:
    if n in cfg and cfg[n] is not None:
      return cfg[n]
  return default


def hf_rope_theta(cfg: Mapping[str, Any], default: float = 10000.0) -> float:
  """`rope_theta` (transformers 4.x) or `rope_parameters.rope_theta` (5.x)."""
  params = cfg.get("rope_parameters") or {}
  if isinstance(params, Mapping) and "rope_theta" in params:
    return float(params["rope_theta"])
  return float(cfg.get("rope_theta", default))


def hf_dtype(cfg: Mapping[str, Any]) -> str | None:
  """`torch_dtype` (4.x) or `dtype` (5.x), normalised to a numpy-style name."""
  d = hf_value(cfg, "dtype", "torch_dtype")
  return None if d is None else str(d).replace("torch.", "")


ARCHITECTURES = ("flashvl", "siglip", "aimv2", "qwen2")


def detect_architecture(cfg: Mapping[str, Any], where: str = "config.json") -> str:
  """'flashvl', 'siglip', 'aimv2' or 'qwen2' from an HF config dict; anything else is an error naming it."""
  if "vision_config" in cfg and "llm_config" in cfg:
    return "flashvl"
  model_type = str(cfg.get("model_type", ""))
  archs = cfg.get("architectures") or []
  for arch in ("siglip", "aimv2", "qwen2"):
    if model_type.startswith(arch) or any(str(a).lower().startswith(arch) for a in archs):
      return arch
  raise CheckpointError(f"{where}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
                        "supported: Flash-VL (vision_config + llm_config), SiglipModel / SiglipVisionModel, "
                        "Aimv2VisionModel (transformers or Apple layout), Qwen2ForCausalLM")


class SafetensorsReader:
  """Lazy access to one `model.safetensors` or a sharded set with `model.safetensors.index.json`."""

  def __init__(self, path: str | pathlib.Path):
    path = pathlib.Path(path)
    if not path.exists():
      raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if (path / INDEX_FILE).is_file():
      index = json.loads((path / INDEX_FILE).read_text())
      files = sorted(set(index["weight_map"].values()))
    elif (path / SINGLE_FILE).is_file():
      files = [SINGLE_FILE]
    else:
      files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
      raise CheckpointError(f"no weights found in {str(path)!r}: expected {SINGLE_FILE}, {INDEX_FILE} "
                            f"or *.safetensors files")
    self.path = path
    self._handles = {}
    self._where: dict[str, str] = {}
    for f in files:
      if not (path / f).is_file():
        raise CheckpointError(f"{INDEX_FILE} in {str(path)!r} names {f!r}, which is missing")
      try:
        h = safe_open(str(path / f), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path / f} is not a readable safetensors file: {e}") from None
      self._handles[f] = h
      for k in h.keys():
        if k in self._where:
          raise CheckpointError(f"tensor {k!r} appears in both {self._where[k]} and {f}")
        self._where[k] = f

  def keys(self) -> list[str]:
    return sorted(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._handles[self._where[key]].get_slice(key).get_dtype()

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: self.shape(k) for k in self.keys()}

  def get(self, key: str) -> np.ndarray:
    # A fresh handle per tensor: a long-lived memory map keeps every page read so far resident (3 GB of RSS after
    # streaming a Qwen2-1.5B file); closing it releases them.
    with safe_open(str(self.path / self._where[key]), framework="numpy") as handle:
      return handle.get_tensor(key)


def _path_str(path: Iterable[Any]) -> str:
  return ".".join(str(p) for p in path)


def param_shapes(module_or_state: Any) -> dict[str, tuple[int, ...]]:
  """Our path ('model.layers.0.self_attn.q_proj.kernel') -> shape, for every nnx.Param."""
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
  return {_path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


def param_dtypes(module_or_state: Any) -> dict[str, np.dtype]:
  """Our path -> dtype, for every nnx.Param (what `mapping.run_import` assembles stacked leaves in)."""
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
  return {_path_str(p): np.dtype(v.dtype) for p, v in nnx.to_flat_state(state)}


def param_arrays(module: nnx.Module) -> dict[str, jax.Array]:
  """Our path -> array for every nnx.Param."""
  return {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def load_params(module: nnx.Module, table: Table, reader: SafetensorsReader, what: str = "checkpoint",
                shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> nnx.Module:
  """Fills every parameter of `module` from `reader` through `table` (in place); strict on keys and shapes.

  Values are cast to each parameter's existing dtype (its `param_dtype`) and, with `shardings` (our path ->
  sharding), placed tensor by tensor, so no device holds more of the model than its shards.
  """
  state = nnx.state(module, nnx.Param)
  variables = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
  steps = table.plan_import(reader.shapes(), {k: tuple(v.shape) for k, v in variables.items()}, what=what)
  dtypes = {k: np.dtype(v.get_value().dtype) for k, v in variables.items()}
  for path, arr in run_import(steps, reader.get, dtypes):
    var = variables[path]
    if shardings is None:
      var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
    else:
      var.set_value(jax.device_put(arr.astype(var.get_value().dtype), shardings[path]))
  return module


def load_hf_module(make_module: Callable[[], nnx.Module], table: Table, reader: SafetensorsReader, *,
                   what: str = "checkpoint", mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """The module `make_module()` builds, with its parameters read from `reader` through `table`.

  The module is only traced (`nnx.eval_shape`), so no random initialisation runs and no parameter exists twice.
  With a `mesh`, each parameter goes straight into the sharding `sharding.RULES` give it there.
  """
  with nnx.use_eager_sharding(False):
    module = nnx.eval_shape(make_module)
  shardings = None
  if mesh is not None:
    placement = state_shardings(nnx.state(module, nnx.Param), mesh)
    shardings = {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(placement)}
  return load_params(module, table, reader, what=what, shardings=shardings)


__all__ = [
    "ARCHITECTURES", "CheckpointError", "detect_architecture", "SafetensorsReader", "WeightMappingError", "hf_dtype", "hf_rope_theta", "hf_value",
    "load_hf_module", "load_params", "param_arrays", "param_dtypes", "param_shapes", "read_hf_config"
]
