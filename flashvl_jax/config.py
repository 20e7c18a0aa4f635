"""Typed configuration for Flash-VL models, read from plain YAML.

Every config is a frozen dataclass. `from_dict` validates a nested dict once: an unknown key, a wrong
type, a bad enum value or a number outside its field's range (`bounded`) raises `ConfigError` naming the
dotted key (with a "did you mean" hint).
Presets live as YAML in the repository's `configs/models/` (importable as `flashvl_jax.configs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import operator
import pathlib
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml

from flashvl_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A configuration file or override is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Range:
  """Bounds of a numeric field; None: unbounded on that side."""

  ge: float | None = None
  gt: float | None = None
  le: float | None = None
  lt: float | None = None

  def violation(self, value: float) -> str | None:
    for bound, word, holds in ((self.ge, ">=", operator.ge), (self.gt, ">", operator.gt), (self.le, "<=", operator.le),
                               (self.lt, "<", operator.lt)):
      if bound is not None and not holds(value, bound):
        return f"must be {word} {bound}"
    return None


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
  """A numeric dataclass field whose range `from_dict` checks (a None value is not checked)."""
  return dataclasses.field(default=default, metadata={"range": Range(ge, gt, le, lt)})


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT tower: `siglip` (SiglipVisionModel) or `aimv2` (Aimv2VisionModel). Field names follow HF."""

  kind: Literal["siglip", "aimv2"] = "siglip"
  image_size: int = bounded(512, ge=1)
  patch_size: int = bounded(16, ge=1)
  num_channels: int = bounded(3, ge=1)
  hidden_size: int = bounded(1152, ge=1)
  intermediate_size: int = bounded(4304, ge=1)
  num_hidden_layers: int = bounded(27, ge=1)
  num_attention_heads: int = bounded(16, ge=1)
  norm_eps: float = bounded(1e-6, gt=0)  # SigLIP LayerNorm 1e-6; AIMv2 RMSNorm 1e-5
  use_head: bool = False  # SigLIP MAP pooling head (unused by Flash-VL, kept for SiglipModel checkpoints)

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"vision.hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
    if self.use_head and self.kind != "siglip":
      raise ConfigError("vision.use_head is only defined for kind 'siglip'")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Qwen2 / Qwen2.5 causal LM (`Qwen2ForCausalLM`). Field names follow HF."""

  vocab_size: int = bounded(151936, ge=1)
  hidden_size: int = bounded(1536, ge=1)
  intermediate_size: int = bounded(8960, ge=1)
  num_hidden_layers: int = bounded(28, ge=1)
  num_attention_heads: int = bounded(12, ge=1)
  num_key_value_heads: int = bounded(2, ge=1)
  head_dim: int = bounded(128, ge=2)
  rope_theta: float = bounded(1_000_000.0, gt=0)
  rms_norm_eps: float = bounded(1e-6, gt=0)
  tie_word_embeddings: bool = True
  max_position_embeddings: int = bounded(32768, ge=1)

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"llm.num_attention_heads {self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"llm.head_dim {self.head_dim} must be even for RoPE")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Pixel-shuffle adapter between the ViT and the LLM.

  kind `ln_mlp3`: LayerNorm(4C, eps) -> Linear -> GELU(erf) -> Linear -> GELU(erf) -> Linear(proj) (Flash-VL).
  kind `mlp2`: Linear -> GELU(erf) -> Linear (the paper's Table 8 baseline). Both shuffle 2x2 first.
  token_order `row_major` is InternVL's `pixel_shuffle(ps_version='v2')`; `column_major` is its v1 order
  (no final transpose of the token grid).
  """

  kind: Literal["ln_mlp3", "mlp2"] = "ln_mlp3"
  intermediate_size: int = bounded(6912, ge=1)
  shuffle_factor: int = bounded(2, ge=1)
  token_order: Literal["row_major", "column_major"] = "row_major"
  norm_eps: float = bounded(1e-5, gt=0)


@dataclasses.dataclass(frozen=True)
class TilingConfig:
  """How an image becomes tiles and image tokens (see `flashvl_jax.preprocess.tiling`)."""

  mode: Literal["static", "dynamic", "overlap", "iss"] = "static"
  max_tiles: int = 4
  thumbnail: bool = False  # dynamic/overlap/iss: append a global view of the whole image (grids of > 1 tile)
  slice_markers: bool = False  # dynamic: wrap each tile's tokens in slice start/end markers
  margin_patches: int = 4  # iss/overlap: context margin in patches on each side of a tile's core

  def __post_init__(self):
    if self.max_tiles < 1:
      raise ConfigError(f"tiling.max_tiles must be >= 1, got {self.max_tiles}")
    if self.margin_patches < 0:
      raise ConfigError(f"tiling.margin_patches must be >= 0, got {self.margin_patches}")


@dataclasses.dataclass(frozen=True)
class FlashVLConfig:
  """The composite: vision tower -> adapter -> Qwen2, with tiling and the dtype policy."""

  name: str = "flashvl"
  vision: VisionConfig = VisionConfig()
  adapter: AdapterConfig = AdapterConfig()
  llm: LLMConfig = LLMConfig()
  tiling: TilingConfig = TilingConfig()
  vision_feature: Literal["post_norm", "pre_norm"] = "post_norm"  # which ViT output feeds the adapter
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  image_token_id: int = -200  # first placeholder position of an image (IMAGE_TOKEN_INDEX)
  image_pad_token_id: int = -201  # the other placeholder positions (IMAGE_PAD_TOKEN_INDEX)

  def __post_init__(self):
    if self.vision.grid_size % self.adapter.shuffle_factor:
      raise ConfigError(
          f"vision grid {self.vision.grid_size} is not divisible by adapter.shuffle_factor "
          f"{self.adapter.shuffle_factor}")

  @property
  def tokens_per_tile(self) -> int:
    """Image tokens one full tile yields after pixel shuffle (256 for SigLIP2-512, 256 for AIMv2-448)."""
    return (self.vision.grid_size // self.adapter.shuffle_factor)**2


T = TypeVar("T")
# The model presets of each Flash-VL variant, at full size and as tiny test models (benchmarks pick from these).
PRESETS_BY_SIZE = {
    "full": {"static": "flashvl-2b-static", "dynamic": "flashvl-2b-dynamic", "iss": "flashvl-2b-dynamic-iss"},
    "tiny": {"static": "tiny-static", "dynamic": "tiny-dynamic", "iss": "tiny-iss"},
}


def _suggest(key: str, options: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, options, n=1)
  return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
    return from_dict(tp, value, prefix=f"{where}.")
  if origin is Literal:
    options = typing.get_args(tp)
    if value not in options:
      raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, options))}")
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError("; ".join(errors))
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    item = args[0] if args else Any
    return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
  if origin is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)
  if tp is Any:
    return value
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{where}: expected true/false, got {value!r}")
  if tp is int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
      raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(value)
  if tp is float:
    if isinstance(value, bool):
      raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
      return float(value)  # YAML reads 1e-6 as a string
    except (TypeError, ValueError):
      raise ConfigError(f"{where}: expected a number, got {value!r}") from None
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
  raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
  """Builds dataclass `cls` from nested `data`, rejecting unknown keys and wrong types by name."""
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  for key in data:
    if key not in names:
      raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(key, names)}")
  kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
  for field in dataclasses.fields(cls):
    bounds = field.metadata.get("range")
    value = kwargs.get(field.name)
    problem = bounds.violation(value) if bounds is not None and isinstance(value, (int, float)) else None
    if problem:
      raise ConfigError(f"{prefix}{field.name} {problem}, got {value}")
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
  """The inverse of `from_dict`: plain nested dicts/lists, ready for YAML or JSON."""

  def plain(v):
    if isinstance(v, tuple):
      return [plain(x) for x in v]
    return v

  return {k: (to_dict(v) if dataclasses.is_dataclass(v) else plain(v)) for k, v in dataclasses.asdict(cfg).items()}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  node = data
  for p in parts[:-1]:
    if node.get(p) is None:  # a missing or null section (e.g. `lora: null`) gets created
      node[p] = {}
    node = node[p]
    if not isinstance(node, dict):
      raise ConfigError(f"override '{dotted}': '{p}' is not a section")
  node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies `a.b.c=value` strings (values parsed as YAML scalars) to a nested dict, in place."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like key=value (e.g. llm.rope_theta=10000)")
    key, raw = item.split("=", 1)
    try:
      value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote regexes "
                        "with single quotes, e.g. optimizer.trainable=['\\.lora_(a|b)$']") from None
    _set_dotted(data, key.strip(), value)
  return data


def preset_names(section: str = "models") -> list[str]:
  """The YAML names in `configs/<section>/` (models: model presets; train: training configs)."""
  root = importlib.resources.files("flashvl_jax.configs").joinpath(section)
  return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_yaml(name_or_path: str | pathlib.Path, section: str = "models") -> dict[str, Any]:
  """Reads a YAML file by path, or a preset by name from `configs/<section>/`."""
  path = pathlib.Path(name_or_path)
  if path.suffix in (".yaml", ".yml") or path.exists():
    if not path.exists():
      raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
  else:
    res = importlib.resources.files("flashvl_jax.configs").joinpath(section, f"{name_or_path}.yaml")
    if not res.is_file():
      names = preset_names(section)
      close = difflib.get_close_matches(str(name_or_path), names, n=1)
      hint = f"did you mean '{close[0]}'? " if close else ""
      raise ConfigError(f"no {'preset' if section == 'models' else 'config'} named {str(name_or_path)!r} in "
                        f"configs/{section}/ ({hint}available: {', '.join(names)}; or pass a YAML path)")
    path = pathlib.Path(str(res))
    text = res.read_text()
  try:
    data = yaml.safe_load(text) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{name_or_path}: the top level must be a mapping")
  return data


def load_config(name_or_path: str | pathlib.Path | FlashVLConfig,
                overrides: Sequence[str] = ()) -> FlashVLConfig:
  """A `FlashVLConfig` from a preset name (e.g. 'flashvl-2b-static'), a YAML path, or a config."""
  if isinstance(name_or_path, FlashVLConfig):
    if not overrides:
      return name_or_path
    data = to_dict(name_or_path)
  else:
    data = read_yaml(name_or_path)
  return from_dict(FlashVLConfig, apply_overrides(data, overrides))
