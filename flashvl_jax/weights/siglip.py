"""SigLIP vision tower <-> Hugging Face checkpoints: key table, config translation, loading.

Handles both files transformers writes: `SiglipVisionModel` (unprefixed keys in transformers 5; `vision_model.`
in 4.x) and the full `SiglipModel` (`vision_model.*` plus a text tower, `logit_scale`, `logit_bias`, which are
knowingly dropped). FlashVL-2B-Static's SigLIP2-so400m/16@512 is a `SiglipModel` of `model_type` 'siglip';
the NaFlex `siglip2` architecture is a different model and is rejected.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
from flax import nnx

from flashvl_jax.config import ConfigError, VisionConfig
from flashvl_jax.models.siglip import SiglipVisionTower
from flashvl_jax.weights.hf_io import SafetensorsReader, load_hf_module, read_hf_config
from flashvl_jax.weights.mapping import CONV, Rule, Table, linear_rules, norm_rules, split_linear, split_rows

VISION_PREFIX = "vision_model."
DROPPED_PREFIXES = ("text_model.",)  # SiglipModel parts a vision tower does not use
DROPPED_KEYS = ("logit_scale", "logit_bias")

# transformers `SiglipVisionConfig` defaults: 4.x config.json files only hold the fields that differ from them.
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6, vision_use_head=True,
                   hidden_act="gelu_pytorch_tanh")


def _head_rules(use_head: bool) -> list[Rule]:
  rules = [
      Rule("head.probe", "head.probe"),
      Rule("head.attention.in_proj_weight", tuple(f"head.attention.{n}_proj.kernel" for n in "qkv"), split_linear(3)),
      Rule("head.attention.in_proj_bias", tuple(f"head.attention.{n}_proj.bias" for n in "qkv"), split_rows(3)),
      *linear_rules("head.attention.out_proj", "head.attention.out_proj"),
      *norm_rules("head.layernorm", "head.layernorm"),
      *linear_rules("head.mlp.fc1", "head.mlp.fc1"),
      *linear_rules("head.mlp.fc2", "head.mlp.fc2"),
  ]
  return rules if use_head else [Rule(r.hf, None) for r in rules]


def table(cfg: VisionConfig) -> Table:
  """HF `SiglipVisionModel` keys (unprefixed) <-> `SiglipVisionTower` paths; head keys dropped unless use_head."""
  layer = "encoder.layers.{i}"
  rules = [
      Rule("embeddings.patch_embedding.weight", "embeddings.patch_embedding.kernel", CONV),
      Rule("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias"),
      Rule("embeddings.position_embedding.weight", "embeddings.position_embedding"),
      *norm_rules(f"{layer}.layer_norm1", f"{layer}.layer_norm1"),
      *[r for n in ("q", "k", "v", "out") for r in linear_rules(f"{layer}.self_attn.{n}_proj",
                                                               f"{layer}.self_attn.{n}_proj")],
      *norm_rules(f"{layer}.layer_norm2", f"{layer}.layer_norm2"),
      *linear_rules(f"{layer}.mlp.fc1", f"{layer}.mlp.fc1"),
      *linear_rules(f"{layer}.mlp.fc2", f"{layer}.mlp.fc2"),
      *norm_rules("post_layernorm", "post_layernorm"),
      *_head_rules(cfg.use_head),
  ]
  return Table(rules, "siglip")


def dropped_keys_table(hf_keys: Iterable[str], prefixes: tuple[str, ...], keys: tuple[str, ...], name: str) -> Table:
  """Rules with `ours=None` for exactly the listed checkpoint keys that belong to other model parts."""
  return Table([Rule(k, None) for k in sorted(hf_keys) if k.startswith(prefixes) or k in keys], name)


def checkpoint_table(cfg: VisionConfig, hf_keys: Iterable[str]) -> Table:
  """The table for a given checkpoint: detects the `vision_model.` prefix (SiglipModel, or a 4.x
  SiglipVisionModel) and drops the text tower and logit scale/bias."""
  hf_keys = list(hf_keys)
  base = table(cfg)
  if not any(k.startswith(VISION_PREFIX) for k in hf_keys):
    return base
  return base.with_prefix(VISION_PREFIX, "", "siglip[vision_model.]") + dropped_keys_table(
      hf_keys, DROPPED_PREFIXES, DROPPED_KEYS, "siglip-dropped")


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(f"SigLIP {name} {value} is not square; only square sizes are supported")
    value = value[0]
  return int(value)


def config_from_hf(hf: Mapping[str, Any]) -> VisionConfig:
  """`VisionConfig` from a SigLIP config.json (`SiglipVisionModel`, or `SiglipModel` with `vision_config`)."""
  model_type = hf.get("model_type")
  if model_type in ("siglip2", "siglip2_vision_model"):
    raise ConfigError(f"model_type {model_type!r} is the SigLIP2 NaFlex architecture, which this tower does not "
                      "implement; use a fixed-resolution 'siglip' checkpoint (e.g. siglip2-so400m-patch16-512)")
  if model_type not in (None, "siglip", "siglip_vision_model"):
    raise ConfigError(f"expected a SigLIP config (model_type 'siglip' or 'siglip_vision_model'), got {model_type!r}")
  vc = {**HF_DEFAULTS, **{k: v for k, v in (hf.get("vision_config") or hf).items() if v is not None}}
  if vc["hidden_act"] != "gelu_pytorch_tanh":
    raise ConfigError(f"SigLIP hidden_act {vc['hidden_act']!r} is not supported; the tower implements "
                      "'gelu_pytorch_tanh'")
  return VisionConfig(kind="siglip",
                      image_size=_square(vc["image_size"], "image_size"),
                      patch_size=_square(vc["patch_size"], "patch_size"),
                      num_channels=int(vc["num_channels"]),
                      hidden_size=int(vc["hidden_size"]),
                      intermediate_size=int(vc["intermediate_size"]),
                      num_hidden_layers=int(vc["num_hidden_layers"]),
                      num_attention_heads=int(vc["num_attention_heads"]),
                      norm_eps=float(vc["layer_norm_eps"]),
                      use_head=bool(vc["vision_use_head"]))


def hf_config_from(cfg: VisionConfig, dtype: str = "float32") -> dict[str, Any]:
  """A `SiglipVisionModel` config.json for `cfg` (what `table(cfg)` exports)."""
  if cfg.kind != "siglip":
    raise ValueError(f"hf_config_from needs a SigLIP config, got kind {cfg.kind!r}")
  return {
      "architectures": ["SiglipVisionModel"],
      "model_type": "siglip_vision_model",
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_channels": cfg.num_channels,
      "image_size": cfg.image_size,
      "patch_size": cfg.patch_size,
      "hidden_act": "gelu_pytorch_tanh",
      "layer_norm_eps": cfg.norm_eps,
      "attention_dropout": 0.0,
      "vision_use_head": cfg.use_head,
      "dtype": dtype,
  }


def load_siglip(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                use_head: bool | None = None) -> SiglipVisionTower:
  """A `SiglipVisionTower` from an HF checkpoint directory (config.json + safetensors).

  `use_head=None` follows the checkpoint's `vision_use_head`; False skips the MAP head (Flash-VL does not use it).
  """
  hf = read_hf_config(path)
  cfg = config_from_hf(hf)
  if use_head is not None:
    cfg = dataclasses.replace(cfg, use_head=use_head)
  reader = SafetensorsReader(path)
  return load_hf_module(lambda: SiglipVisionTower(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                        checkpoint_table(cfg, reader.keys()), reader, what=f"SigLIP checkpoint {path}")


__all__ = ["checkpoint_table", "config_from_hf", "hf_config_from", "load_siglip", "table"]
