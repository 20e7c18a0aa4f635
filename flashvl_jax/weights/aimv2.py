"""AIMv2 vision tower <-> Hugging Face checkpoints, in both layouts that exist.

- transformers `Aimv2VisionModel` (unprefixed `embeddings.* / encoder.layers.i.* / rms_norm.*`; a full
  `Aimv2Model` nests it under `vision_model.` next to a text tower that is knowingly dropped);
- Apple's original remote code (`AIMv2Model`, used by FlashVL-2B-Dynamic): `preprocessor.*`, `trunk.blocks.i.*`
  with a fused `attn.qkv` [3D, D] (rows q; k; v), `pos_embed` [1, N, D], SwiGLU `mlp.fc1` = gate,
  `fc3` = up, `fc2` = down, `trunk.post_trunk_norm`.
Both go through `mapping.Table`, so import and export (`Table.plan_export`) use the same rules.
A pooling head (LiT checkpoints) is dropped: Flash-VL feeds patch tokens to its adapter.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Literal, Mapping

import jax.numpy as jnp
from flax import nnx

from flashvl_jax.config import ConfigError, VisionConfig
from flashvl_jax.models.aimv2 import Aimv2VisionTower
from flashvl_jax.weights.hf_io import SafetensorsReader, load_hf_module, read_hf_config
from flashvl_jax.weights.mapping import CONV, LINEAR, SQUEEZE0, Rule, Table, split_linear
from flashvl_jax.weights.siglip import VISION_PREFIX, dropped_keys_table

APPLE_PREFIXES = ("preprocessor.", "trunk.")
DROPPED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.")  # full transformers Aimv2Model
DROPPED_KEYS = ("logit_scale",)
HEAD_KEYS = ("head.cls_token", "head.k_proj.weight", "head.v_proj.weight", "head.output_proj.weight",
             "head.output_proj.bias")

# Defaults of transformers `Aimv2VisionConfig`; Apple's `AIMv2Config` has the same values for its fields.
HF_DEFAULTS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8,
                   num_channels=3, image_size=224, patch_size=14, rms_norm_eps=1e-5, hidden_act="silu",
                   qkv_bias=False, mlp_bias=False, use_bias=False, is_native=False)


def table(cfg: VisionConfig) -> Table:
  """transformers `Aimv2VisionModel` keys <-> `Aimv2VisionTower` paths (no biases except the patch conv)."""
  del cfg  # the layout does not depend on sizes
  layer = "encoder.layers.{i}"
  rules = [
      Rule("embeddings.patch_embed.weight", "embeddings.patch_embed.kernel", CONV),
      Rule("embeddings.patch_embed.bias", "embeddings.patch_embed.bias"),
      Rule("embeddings.rms_norm.weight", "embeddings.rms_norm.scale"),
      Rule("embeddings.position_embedding.weight", "embeddings.position_embedding"),
      Rule(f"{layer}.rms_norm1.weight", f"{layer}.rms_norm1.scale"),
      *[Rule(f"{layer}.attention.{n}_proj.weight", f"{layer}.attention.{n}_proj.kernel", LINEAR)
        for n in ("q", "k", "v", "out")],
      Rule(f"{layer}.rms_norm2.weight", f"{layer}.rms_norm2.scale"),
      *[Rule(f"{layer}.ffn.{n}_proj.weight", f"{layer}.ffn.{n}_proj.kernel", LINEAR) for n in ("gate", "up", "down")],
      Rule("rms_norm.weight", "rms_norm.scale"),
      *[Rule(k, None) for k in HEAD_KEYS],
  ]
  return Table(rules, "aimv2")


def apple_table(cfg: VisionConfig) -> Table:
  """Apple's remote-code `AIMv2Model` keys <-> `Aimv2VisionTower` paths."""
  del cfg
  block, layer = "trunk.blocks.{i}", "encoder.layers.{i}"
  rules = [
      Rule("preprocessor.patchifier.proj.weight", "embeddings.patch_embed.kernel", CONV),
      Rule("preprocessor.patchifier.proj.bias", "embeddings.patch_embed.bias"),
      Rule("preprocessor.patchifier.norm.weight", "embeddings.rms_norm.scale"),
      Rule("preprocessor.pos_embed", "embeddings.position_embedding", SQUEEZE0),
      Rule(f"{block}.norm_1.weight", f"{layer}.rms_norm1.scale"),
      Rule(f"{block}.attn.qkv.weight", tuple(f"{layer}.attention.{n}_proj.kernel" for n in "qkv"), split_linear(3)),
      Rule(f"{block}.attn.proj.weight", f"{layer}.attention.out_proj.kernel", LINEAR),
      Rule(f"{block}.norm_2.weight", f"{layer}.rms_norm2.scale"),
      Rule(f"{block}.mlp.fc1.weight", f"{layer}.ffn.gate_proj.kernel", LINEAR),
      Rule(f"{block}.mlp.fc3.weight", f"{layer}.ffn.up_proj.kernel", LINEAR),
      Rule(f"{block}.mlp.fc2.weight", f"{layer}.ffn.down_proj.kernel", LINEAR),
      Rule("trunk.post_trunk_norm.weight", "rms_norm.scale"),
  ]
  return Table(rules, "aimv2-apple")


def checkpoint_table(cfg: VisionConfig, hf_keys: Iterable[str]) -> Table:
  """The table for a given checkpoint's keys: Apple layout, transformers `Aimv2VisionModel`, or a full
  transformers `Aimv2Model` (`vision_model.` prefix; text tower and projections dropped)."""
  hf_keys = list(hf_keys)
  if any(k.startswith(APPLE_PREFIXES) for k in hf_keys):
    return apple_table(cfg)
  if any(k.startswith(VISION_PREFIX) for k in hf_keys):
    return table(cfg).with_prefix(VISION_PREFIX, "", "aimv2[vision_model.]") + dropped_keys_table(
        hf_keys, DROPPED_PREFIXES, DROPPED_KEYS, "aimv2-dropped")
  return table(cfg)


def is_apple_config(hf: Mapping[str, Any]) -> bool:
  """Apple's remote-code config: `model_type` 'aimv2' with the vision fields at the top level."""
  return hf.get("model_type") == "aimv2" and "vision_config" not in hf


def config_from_hf(hf: Mapping[str, Any]) -> VisionConfig:
  """`VisionConfig` from an AIMv2 config.json: transformers `Aimv2VisionConfig`, a full `Aimv2Config`
  (nested `vision_config`), or Apple's `AIMv2Config` (same field names plus `use_bias`, `projection_dropout`)."""
  model_type = hf.get("model_type")
  if model_type not in (None, "aimv2", "aimv2_vision_model"):
    raise ConfigError(f"expected an AIMv2 config (model_type 'aimv2' or 'aimv2_vision_model'), got {model_type!r}")
  vc = {**HF_DEFAULTS, **{k: v for k, v in (hf.get("vision_config") or hf).items() if v is not None}}
  unsupported = [f"{k}={vc[k]!r}" for k in ("qkv_bias", "mlp_bias", "use_bias", "is_native") if vc[k]]
  if vc["hidden_act"] != "silu":
    unsupported.append(f"hidden_act={vc['hidden_act']!r}")
  if unsupported:
    raise ConfigError(f"AIMv2 settings not supported by Aimv2VisionTower: {', '.join(unsupported)} (it implements "
                      "the fixed-resolution, bias-free, SiLU-gated tower of aimv2-*-patch14-224/336/448)")
  return VisionConfig(kind="aimv2",
                      image_size=int(vc["image_size"]),
                      patch_size=int(vc["patch_size"]),
                      num_channels=int(vc["num_channels"]),
                      hidden_size=int(vc["hidden_size"]),
                      intermediate_size=int(vc["intermediate_size"]),
                      num_hidden_layers=int(vc["num_hidden_layers"]),
                      num_attention_heads=int(vc["num_attention_heads"]),
                      norm_eps=float(vc["rms_norm_eps"]),
                      use_head=False)


def hf_config_from(cfg: VisionConfig, layout: Literal["transformers", "apple"] = "transformers",
                   dtype: str = "float32") -> dict[str, Any]:
  """config.json for `cfg` in the layout `table` ('transformers') or `apple_table` ('apple') exports."""
  if cfg.kind != "aimv2":
    raise ValueError(f"hf_config_from needs an AIMv2 config, got kind {cfg.kind!r}")
  sizes = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
               num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
               rms_norm_eps=cfg.norm_eps, attention_dropout=0.0, qkv_bias=False)
  if layout == "transformers":
    return {"architectures": ["Aimv2VisionModel"], "model_type": "aimv2_vision_model", **sizes, "hidden_act": "silu",
            "mlp_bias": False, "use_head": False, "is_native": False, "dtype": dtype}
  if layout == "apple":
    return {"architectures": ["AIMv2Model"], "model_type": "aimv2", **sizes, "use_bias": False,
            "projection_dropout": 0.0, "torch_dtype": dtype}
  raise ValueError(f"unknown AIMv2 layout {layout!r}; use 'transformers' or 'apple'")


def load_aimv2(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Aimv2VisionTower:
  """An `Aimv2VisionTower` from an HF checkpoint directory in either layout (detected from the keys)."""
  cfg = config_from_hf(read_hf_config(path))
  reader = SafetensorsReader(path)
  return load_hf_module(lambda: Aimv2VisionTower(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                        checkpoint_table(cfg, reader.keys()), reader, what=f"AIMv2 checkpoint {path}")


__all__ = ["apple_table", "checkpoint_table", "config_from_hf", "hf_config_from", "load_aimv2", "table"]
