"""AIMv2 vision tower (HF `Aimv2VisionModel`, fixed-resolution, no head), Flax NNX.

patch conv -> RMSNorm -> + learned positions (the norm comes *before* the position add) ->
N x [x += attn(RMS1(x)); x += SwiGLU(RMS2(x))] -> final RMSNorm. No biases except the patch conv.
It is SigLIP with RMSNorm and SwiGLU, so attention and the block stack are shared with `siglip.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flashvl_jax.config import VisionConfig
from flashvl_jax.models.layers import RMSNorm, SwiGLU, check_pixels, to_dtype
from flashvl_jax.models.siglip import ACT, VisionAttention, VisionEncoder, patch_conv, patchify, position_table
from flashvl_jax.sharding import constrain


class Aimv2Embeddings(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.patch_embed = patch_conv(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rms_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.position_embedding = position_table(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    h = self.rms_norm(patchify(self.patch_embed, pixels))
    return h + self.position_embedding[...].astype(h.dtype)


class Aimv2EncoderLayer(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.rms_norm1 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
    self.attention = VisionAttention(cfg.hidden_size, cfg.num_attention_heads, use_bias=False, rngs=rngs, **kw)
    self.rms_norm2 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
    self.ffn = SwiGLU(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **kw)

  def __call__(self, h: jax.Array) -> jax.Array:
    h = h + self.attention(self.rms_norm1(h))
    return constrain(h + self.ffn(self.rms_norm2(h)), ACT)


class Aimv2VisionTower(nnx.Module):
  """HF `Aimv2VisionModel` on NHWC pixels [B, H, W, C] at the native image size; returns [B, N, D]."""

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if cfg.kind != "aimv2":
      raise ValueError(f"Aimv2VisionTower needs vision.kind 'aimv2', got {cfg.kind!r}")
    self.cfg = cfg
    self.dtype = to_dtype(dtype)
    kw = dict(dtype=self.dtype, param_dtype=to_dtype(param_dtype))
    self.embeddings = Aimv2Embeddings(cfg, rngs=rngs, **kw)
    self.encoder = VisionEncoder(lambda rngs: Aimv2EncoderLayer(cfg, rngs=rngs, **kw), cfg.num_hidden_layers, rngs)
    self.rms_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)

  def forward_features(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pre_norm, post_norm), each [B, N, D]: the last block's output (HF `hidden_states[-1]`) and the final
    RMSNorm of it (HF `last_hidden_state`)."""
    check_pixels(pixels, self.cfg.image_size, self.cfg.num_channels, "Aimv2VisionTower")
    h = self.encoder(constrain(self.embeddings(pixels.astype(self.dtype)), ACT))
    return h, self.rms_norm(h)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.forward_features(pixels)[1]
