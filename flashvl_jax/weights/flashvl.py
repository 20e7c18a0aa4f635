"""Flash-VL checkpoints in the released layout: `vit.*` (SigLIP or AIMv2), `adp.*`, `llm.*`, plus config.json.

config.json holds `vision_config` (a SigLIP or AIMv2 config, plus `proj_output_dim`), `llm_config` (Qwen2),
and top-level `intermediate_size` (adapter width) and `image_token_num`. Sizes are read from the config and
checked against the tensor shapes; the adapter width comes from the `adp.p0.1.weight` shape when the config
lacks it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

from flax import nnx

from flashvl_jax.config import AdapterConfig, ConfigError, FlashVLConfig, TilingConfig
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.layers import to_dtype
from flashvl_jax.weights import adapter as adapter_weights
from flashvl_jax.weights import aimv2 as aimv2_weights
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights import siglip as siglip_weights
from flashvl_jax.weights.hf_io import SafetensorsReader, load_hf_module, read_hf_config
from flashvl_jax.weights.mapping import Table

VISION_WEIGHTS = {"siglip": siglip_weights, "aimv2": aimv2_weights}
ISS_IMAGE_TOKENS = 576  # the paper's ISS token count for a 2x2 grid


def is_flashvl_config(hf: Mapping[str, Any]) -> bool:
  return "vision_config" in hf and "llm_config" in hf


def vision_kind(vision_hf: Mapping[str, Any]) -> str:
  model_type = str(vision_hf.get("model_type", ""))
  for kind in VISION_WEIGHTS:
    if kind in model_type:
      return kind
  raise ConfigError(f"vision_config.model_type {model_type!r} is neither a SigLIP nor an AIMv2 tower")


def _adapter_config(hf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> AdapterConfig:
  if "adp.proj.weight" in shapes:
    width = shapes["adp.p0.1.weight"][0]
    declared = hf.get("intermediate_size")
    if declared is not None and int(declared) != width:
      raise ConfigError(f"config.json intermediate_size={declared} but adp.p0.1.weight has shape "
                        f"{shapes['adp.p0.1.weight']} (adapter width {width})")
    return AdapterConfig(kind="ln_mlp3", intermediate_size=width)
  if "adp.p0.0.weight" in shapes and "adp.p0.2.weight" in shapes:
    return AdapterConfig(kind="mlp2", intermediate_size=shapes["adp.p0.0.weight"][0])
  raise ConfigError("no adapter weights found: expected adp.p0.{0,1,3}.* and adp.proj.* (or adp.p0.{0,2}.*)")


def config_from_hf(hf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                   tiling: TilingConfig | None = None) -> FlashVLConfig:
  """Our config for a released-layout checkpoint; tiling defaults by tower and `image_token_num`."""
  kind = vision_kind(hf["vision_config"])
  vision = dataclasses.replace(VISION_WEIGHTS[kind].config_from_hf(hf["vision_config"]), use_head=False)
  llm = qwen2_weights.config_from_hf(hf["llm_config"])
  proj = hf["vision_config"].get("proj_output_dim")
  if proj is not None and int(proj) != llm.hidden_size:
    raise ConfigError(f"vision_config.proj_output_dim={proj} differs from llm_config.hidden_size={llm.hidden_size}")
  if tiling is None:
    if kind == "siglip":
      tiling = TilingConfig(mode="static")
    elif hf.get("image_token_num") == ISS_IMAGE_TOKENS:
      tiling = TilingConfig(mode="iss")
    else:
      tiling = TilingConfig(mode="dynamic", thumbnail=True)
  return FlashVLConfig(name=str(hf.get("_name_or_path") or "flashvl"), vision=vision,
                       adapter=_adapter_config(hf, shapes), llm=llm, tiling=tiling)


def table(cfg: FlashVLConfig, hf_keys) -> Table:
  """vit/adp/llm tables under their prefixes; the vision layout (transformers or Apple AIMv2) comes from the keys."""
  vit_keys = [k[len("vit."):] for k in hf_keys if k.startswith("vit.")]
  return composite_table(cfg, VISION_WEIGHTS[cfg.vision.kind].checkpoint_table(cfg.vision, vit_keys))


def composite_table(cfg: FlashVLConfig, vision_table: Table) -> Table:
  """`vision_table` (unprefixed vision keys) under `vit.`, the adapter under `adp.`, Qwen2 under `llm.`."""
  return (vision_table.with_prefix("vit.", "vit.") + adapter_weights.table(cfg.adapter).with_prefix("adp.", "adp.") +
          qwen2_weights.table(cfg.llm).with_prefix("llm.", "llm."))


def load_flashvl(path: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str | None = None,
                 tiling: TilingConfig | None = None) -> FlashVLModel:
  """A `FlashVLModel` from a released-layout HF directory; strict on keys and shapes."""
  hf = read_hf_config(path)
  if not is_flashvl_config(hf):
    raise ConfigError(f"{path}/config.json has no vision_config/llm_config: not a Flash-VL checkpoint")
  reader = SafetensorsReader(path)
  cfg = dataclasses.replace(config_from_hf(hf, reader.shapes(), tiling), dtype=to_dtype(dtype).name,
                            param_dtype=to_dtype(param_dtype or dtype).name)
  qwen2_weights.check_tied_lm_head(reader, cfg.llm, hf_prefix="llm.")
  return load_hf_module(lambda: FlashVLModel(cfg, rngs=nnx.Rngs(0)), table(cfg, reader.keys()), reader,
                        what=f"Flash-VL checkpoint {path}")
