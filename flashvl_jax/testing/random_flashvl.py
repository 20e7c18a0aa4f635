"""Random Flash-VL checkpoints of any preset's shapes, built by the PyTorch reference (needs torch).

  write_random_checkpoint("tiny-static", "ckpt/tiny-hf")   # a released-layout Hugging Face directory

The benchmarks and tests use them; they are also the way to try the tools (`convert`, `chat`, `serve`) without
real weights.
"""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import (Aimv2VisionConfig, Aimv2VisionModel, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
                          SiglipVisionModel)

from flashvl_jax.config import FlashVLConfig, load_config
from flashvl_jax.preprocess.tiling import max_image_tokens
from flashvl_jax.testing.randomize import randomize_
from flashvl_jax.testing.torch_flashvl import TorchAdapter, TorchFlashVL, save_released_layout
from flashvl_jax.weights import aimv2 as aimv2_weights
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights import siglip as siglip_weights


def torch_reference(cfg: FlashVLConfig, *, dtype: str = "float32", seed: int = 0, attn_implementation: str = "sdpa"):
  """A `TorchFlashVL` of `cfg`'s shapes (HF vision tower, adapter, HF Qwen2), every parameter random."""
  if cfg.adapter.token_order != "row_major":
    raise ValueError("the PyTorch reference shuffles tokens in InternVL's v2 (row_major) order only")
  if cfg.vision.kind == "siglip":
    vit = SiglipVisionModel(SiglipVisionConfig.from_dict(siglip_weights.hf_config_from(cfg.vision)))
  else:
    vit = Aimv2VisionModel(Aimv2VisionConfig.from_dict(aimv2_weights.hf_config_from(cfg.vision)))
  llm = Qwen2ForCausalLM(Qwen2Config.from_dict(qwen2_weights.hf_config_from(cfg.llm)))
  adp = TorchAdapter(cfg.vision.hidden_size, cfg.adapter.intermediate_size, cfg.llm.hidden_size, kind=cfg.adapter.kind)
  ref = TorchFlashVL(vit, adp, llm, vision_feature=cfg.vision_feature)
  randomize_(ref, seed)
  for module in (vit, llm):
    module.set_attn_implementation(attn_implementation)
  return ref.to(getattr(torch, dtype)).eval()


def save_reference(ref, cfg: FlashVLConfig, out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes `ref` as a released-layout Flash-VL checkpoint (`vit.*`, `adp.*`, `llm.*` + config.json)."""
  return save_released_layout(ref, out_dir, image_token_num=max_image_tokens(cfg))


def write_random_checkpoint(preset: str | FlashVLConfig, out_dir: str | os.PathLike, *, dtype: str = "float32",
                            seed: int = 0) -> pathlib.Path:
  """A random Flash-VL of a preset's shapes as a released-layout Hugging Face directory (needs torch)."""
  cfg = load_config(preset)
  return save_reference(torch_reference(cfg, dtype=dtype, seed=seed), cfg, out_dir)
