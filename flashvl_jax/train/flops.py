"""Analytic model FLOPs of a Flash-VL training step, and per-device peak FLOP/s for MFU.

Counts matmul FLOPs (2 per multiply-add) of useful work: real tiles, real image tokens and real text
tokens, padding excluded. Causal LLM attention is counted once (half of the T x T score matrix), ViT
attention in full. A training step costs per component: 1x forward, +1x for activation gradients when
it or anything before it (ViT -> adapter -> LLM) trains, +1x for weight gradients when it trains.
Rematerialisation is not counted: MFU measures model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from typing import Mapping

from flashvl_jax.config import FlashVLConfig

COMPONENTS = ("vit", "adp", "llm")  # in data-flow order

# Dense bf16 peak FLOP/s per device (chip for TPUs), matched by substring of `jax.Device.device_kind`,
# most specific first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """The table's peak for a device kind (e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3'); None if unknown (CPU)."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def vit_flops_per_tile(cfg: FlashVLConfig) -> float:
  """Forward FLOPs of the vision tower on one tile."""
  v = cfg.vision
  n, d = v.num_patches, v.hidden_size
  mlp_matrices = 3 if v.kind == "aimv2" else 2  # SwiGLU vs fc1/fc2
  per_layer = 2 * n * (4 * d * d + mlp_matrices * d * v.intermediate_size) + 4 * n * n * d
  return 2 * n * v.patch_size**2 * v.num_channels * d + v.num_hidden_layers * per_layer


def adapter_flops_per_token(cfg: FlashVLConfig) -> float:
  """Forward FLOPs of the adapter per image token."""
  a = cfg.adapter
  d_in, d_out = cfg.vision.hidden_size * a.shuffle_factor**2, cfg.llm.hidden_size
  if a.kind == "ln_mlp3":
    return 2 * (d_in * a.intermediate_size + a.intermediate_size**2 + a.intermediate_size * d_out)
  return 2 * (d_in * d_out + d_out * d_out)


def llm_flops(cfg: FlashVLConfig, tokens: float, sum_sq_lengths: float, lm_head_tokens: float | None = None) -> float:
  """Forward FLOPs of the LLM on `tokens` tokens in rows whose squared lengths sum to `sum_sq_lengths`, with
  the LM head on `lm_head_tokens` of them (default: all)."""
  c = cfg.llm
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  per_token = c.num_hidden_layers * 2 * (2 * c.hidden_size * q + 2 * c.hidden_size * kv +
                                         3 * c.hidden_size * c.intermediate_size)
  attention = c.num_hidden_layers * 2 * q * sum_sq_lengths  # 4 * q * T^2 / 2: causal, counted once
  lm_head = 2 * c.hidden_size * c.vocab_size * (tokens if lm_head_tokens is None else lm_head_tokens)
  return per_token * tokens + attention + lm_head


def train_step_flops(cfg: FlashVLConfig, trains: Mapping[str, bool], *, tiles: float, image_tokens: float,
                     tokens: float, sum_sq_lengths: float, lm_head_tokens: float | None = None) -> float:
  """FLOPs of one optimizer step on a batch; `trains[c]` tells whether component c has trainable weights."""
  forward = {
      "vit": vit_flops_per_tile(cfg) * tiles,
      "adp": adapter_flops_per_token(cfg) * image_tokens,
      "llm": llm_flops(cfg, tokens, sum_sq_lengths, lm_head_tokens),
  }
  total, upstream_trains = 0.0, False
  for c in COMPONENTS:
    upstream_trains = upstream_trains or trains[c]
    total += forward[c] * (1 + upstream_trains + trains[c])
  return total
