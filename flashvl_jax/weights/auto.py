"""`from_hf(path)`: the NNX module of any supported Hugging Face checkpoint directory, chosen from its config.json."""

from __future__ import annotations

import pathlib

from flashvl_jax.weights import aimv2, flashvl, qwen2, siglip
from flashvl_jax.weights.hf_io import detect_architecture, read_hf_config

LOADERS = {"flashvl": flashvl.load_flashvl, "siglip": siglip.load_siglip, "aimv2": aimv2.load_aimv2,
           "qwen2": qwen2.load_qwen2}


def from_hf(path: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str | None = None):
  """The NNX module for a Hugging Face checkpoint directory, chosen from its config.json.

  SiglipModel / SiglipVisionModel -> `SiglipVisionTower` (vision part); Aimv2VisionModel (transformers or
  Apple layout) -> `Aimv2VisionTower`; Qwen2ForCausalLM -> `Qwen2ForCausalLM`; a released Flash-VL
  checkpoint -> `FlashVLModel`. Vision modules take NHWC pixels [B, H, W, 3] and return [B, N, D]; the LM
  takes token ids and returns logits [B, T, V]. Keys and shapes are checked strictly.
  """
  arch = detect_architecture(read_hf_config(path), where=f"{path}/config.json")
  return LOADERS[arch](path, dtype=dtype, param_dtype=param_dtype or dtype)
