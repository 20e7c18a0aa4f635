"""Qwen2 weights and config in the Hugging Face layout (`model.*`, `lm_head.weight`) <-> `Qwen2ForCausalLM`.

Tied embeddings: checkpoints written by transformers omit `lm_head.weight`; one that still carries it is
accepted only if it equals `model.embed_tokens.weight` (`check_tied_lm_head`), and the copy is dropped.
A different head means the config's `tie_word_embeddings: true` is wrong, so loading refuses it.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import numpy as np
from flax import nnx

from flashvl_jax.config import ConfigError, LLMConfig
from flashvl_jax.models.qwen2 import Qwen2ForCausalLM
from flashvl_jax.weights.hf_io import SafetensorsReader, hf_rope_theta, load_hf_module, read_hf_config
from flashvl_jax.weights.mapping import LINEAR, Rule, Table, WeightMappingError, linear_rules, norm_rules

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def table(cfg: LLMConfig) -> Table:
  """HF key <-> our path for every Qwen2ForCausalLM tensor."""
  layer = "model.layers.{i}"
  rules = [
      Rule(EMBED_KEY, "model.embed_tokens.embedding"),
      *norm_rules(f"{layer}.input_layernorm", f"{layer}.input_layernorm", bias=False),
      *norm_rules(f"{layer}.post_attention_layernorm", f"{layer}.post_attention_layernorm", bias=False),
      *linear_rules(f"{layer}.self_attn.o_proj", f"{layer}.self_attn.o_proj", bias=False),
      *norm_rules("model.norm", "model.norm", bias=False),
  ]
  for proj in ("q_proj", "k_proj", "v_proj"):
    rules += linear_rules(f"{layer}.self_attn.{proj}", f"{layer}.self_attn.{proj}")
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules += linear_rules(f"{layer}.mlp.{proj}", f"{layer}.mlp.{proj}", bias=False)
  rules.append(Rule(LM_HEAD_KEY, None if cfg.tie_word_embeddings else "lm_head.kernel", LINEAR))
  return Table(rules, "qwen2")


def check_tied_lm_head(reader: SafetensorsReader, cfg: LLMConfig, hf_prefix: str = "") -> None:
  """With tied embeddings, a stored `lm_head.weight` must equal the embedding (the table then drops it)."""
  head, embed = hf_prefix + LM_HEAD_KEY, hf_prefix + EMBED_KEY
  if not cfg.tie_word_embeddings or head not in reader.keys() or embed not in reader.keys():
    return
  if reader.shape(head) != reader.shape(embed) or not np.array_equal(reader.get(head), reader.get(embed)):
    raise WeightMappingError(
        f"{head} differs from {embed}, but the config ties them (tie_word_embeddings: true); set "
        f"tie_word_embeddings to false in config.json to load a separate output head")


def _reject_unsupported(hf: Mapping[str, Any]) -> None:
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"Qwen2 hidden_act {hf['hidden_act']!r} is not supported; only 'silu' is")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConfigError(f"RoPE scaling type {rope_type!r} is not supported (only the default RoPE); remove "
                      f"rope_scaling / set rope_parameters.rope_type to 'default' if the model does not need it")
  layers = int(hf["num_hidden_layers"])
  sliding = "sliding_attention" in (hf.get("layer_types") or [])
  if hf.get("use_sliding_window") and int(hf.get("max_window_layers", layers)) < layers:
    sliding = True
  if sliding:
    raise ConfigError("sliding-window attention (use_sliding_window / layer_types 'sliding_attention') is not "
                      "supported; Qwen2 checkpoints run with use_sliding_window: false")


def config_from_hf(hf: Mapping[str, Any]) -> LLMConfig:
  """An `LLMConfig` from a Qwen2 config.json dict, in transformers 4.x or 5.x spelling."""
  if hf.get("model_type", "qwen2") != "qwen2":
    raise ConfigError(f"expected a Qwen2 config (model_type 'qwen2'), got model_type {hf.get('model_type')!r}")
  missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "vocab_size") if k not in hf]
  if missing:
    raise ConfigError(f"Qwen2 config.json lacks {', '.join(missing)}")
  _reject_unsupported(hf)
  heads = int(hf["num_attention_heads"])
  return LLMConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_hidden_layers=int(hf["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      rope_theta=hf_rope_theta(hf),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # Qwen2Config's default (4.x and 5.x)
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
  )


def hf_config_from(cfg: LLMConfig, dtype: str = "bfloat16") -> dict[str, Any]:
  """A Qwen2 config.json dict that transformers 4.x (`rope_theta`, `torch_dtype`) and 5.x
  (`rope_parameters`, `dtype`) both read."""
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "use_sliding_window": False,
      "max_window_layers": cfg.num_hidden_layers,
      "attention_dropout": 0.0,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def load_qwen2(path: str | pathlib.Path, dtype="float32", param_dtype="float32") -> Qwen2ForCausalLM:
  """A `Qwen2ForCausalLM` from a Hugging Face directory (config.json + safetensors), strict on keys/shapes."""
  cfg = config_from_hf(read_hf_config(path))
  reader = SafetensorsReader(path)
  check_tied_lm_head(reader, cfg)
  return load_hf_module(lambda: Qwen2ForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                        table(cfg), reader, what=f"Qwen2 checkpoint {str(path)!r}")


__all__ = ["check_tied_lm_head", "config_from_hf", "hf_config_from", "table"]
