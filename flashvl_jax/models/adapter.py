"""The pixel-shuffle adapter between the vision tower and the LLM.

Pixel shuffle is written as a static gather: `preprocess.tiling.pixel_shuffle_index` lists, for each output
token, the
flat indices of the f*f ViT patches it concatenates. Every tiling mode (static, dynamic, overlap, ISS
stitching) produces such an index, so the model runs one fixed gather under jit whatever the layout.

Token order `row_major` equals InternVL's `pixel_shuffle(ps_version='v2')` applied to ViT tokens
reshaped row-major to (h, w, C): token (i, j) = concat over (di, dj) of patch (f*i + di, f*j + dj),
channels ordered (di, dj, c). `column_major` is the v1 order (tokens enumerated j-outer, i-inner).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax.config import AdapterConfig
from flashvl_jax.models.layers import LayerNorm, linear
from flashvl_jax.sharding import constrain


def gather_patches(features: jax.Array, patch_index: jax.Array) -> jax.Array:
  """features [B, P, C], patch_index [B, T, k] (or [T, k]) -> [B, T, k*C], channels ordered (k, c)."""
  if patch_index.ndim == 2:
    patch_index = jnp.broadcast_to(patch_index, (features.shape[0],) + patch_index.shape)
  b, t, k = patch_index.shape
  flat = jnp.take_along_axis(features, patch_index.reshape(b, t * k, 1), axis=1)
  return flat.reshape(b, t, k * features.shape[-1])


class Adapter(nnx.Module):
  """Shuffled ViT features [B, T, f*f*C] -> LLM embeddings [B, T, D]."""

  def __init__(self, cfg: AdapterConfig, vision_hidden: int, llm_hidden: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.cfg = cfg
    in_features = vision_hidden * cfg.shuffle_factor**2
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if cfg.kind == "ln_mlp3":
      self.norm = LayerNorm(in_features, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
      self.linear_1 = linear(in_features, cfg.intermediate_size, ("embed", "mlp"), **kw)
      self.linear_2 = linear(cfg.intermediate_size, cfg.intermediate_size, ("mlp", "embed"), **kw)
      self.proj = linear(cfg.intermediate_size, llm_hidden, ("embed", "embed"), **kw)
    elif cfg.kind == "mlp2":
      self.linear_1 = linear(in_features, llm_hidden, ("embed", "mlp"), **kw)
      self.linear_2 = linear(llm_hidden, llm_hidden, ("mlp", "embed"), **kw)
    else:
      raise ValueError(f"unknown adapter kind {cfg.kind!r}")

  def __call__(self, shuffled: jax.Array) -> jax.Array:
    gelu = lambda x: jax.nn.gelu(x, approximate=False)  # torch nn.GELU(): exact erf
    if self.cfg.kind == "ln_mlp3":
      h = gelu(self.linear_1(self.norm(shuffled)))
      h = constrain(h, ("batch", "length", "act_mlp"))
      h = gelu(self.linear_2(h))
      return self.proj(h)
    h = gelu(self.linear_1(shuffled))
    return self.linear_2(h)
