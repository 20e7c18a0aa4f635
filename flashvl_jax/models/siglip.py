"""SigLIP / SigLIP2 fixed-resolution vision tower (HF `SiglipVisionModel`), Flax NNX.

patch conv -> + learned positions -> N x [x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))))] -> post_layernorm
(-> optional MAP head). Submodule names mirror HF so the weight table in `flashvl_jax.weights.siglip` is short;
the encoder layers are stacked (`encoder.layers.*` leaves are [L, ...]) and scanned.
`VisionAttention` and `VisionEncoder` are shared with the AIMv2 tower.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax.config import VisionConfig
from flashvl_jax.models.layers import (AttentionModule, LayerNorm, LayerStack, check_pixels, linear, merge_heads,
                                       split_heads, stack_layers, to_dtype)
from flashvl_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")  # activation roles at block boundaries


def gelu_tanh(x: jax.Array) -> jax.Array:
  """HF `gelu_pytorch_tanh` (the tanh approximation)."""
  return jax.nn.gelu(x, approximate=True)


def patch_conv(cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """Conv p x p / stride p with bias on NHWC pixels; kernel HWIO (= torch OIHW transposed)."""
  return nnx.Conv(
      cfg.num_channels,
      cfg.hidden_size,
      kernel_size=(cfg.patch_size, cfg.patch_size),
      strides=(cfg.patch_size, cfg.patch_size),
      padding="VALID",
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("patch", "patch", "patch", "embed")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs,
  )


def position_table(cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
  """Learned absolute positions [num_patches, D] in raster order."""
  init = nnx.initializers.normal(cfg.hidden_size**-0.5)
  return nnx.Param(init(rngs.params(), (cfg.num_patches, cfg.hidden_size), param_dtype),
                   out_sharding=("positions", "embed"))


def patchify(conv: nnx.Conv, pixels: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), D], patches in row-major order (torch `flatten(2).transpose(1, 2)`)."""
  x = conv(pixels)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch `interpolate(mode='bicubic', align_corners=False)` along one axis.

  torch: source = (dst + 0.5) * in/out - 0.5 (not clamped), the 4 taps floor(source) - 1 ... + 2 are
  clamped to the border, cubic convolution with A = -0.75.
  """
  a = -0.75
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  t = src - base
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  taps = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [out, 4]
  weights = np.zeros((out_size, in_size))
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(weights, (np.arange(out_size), idx), taps[:, k])
  return weights.astype(np.float32)


def resize_positions(table: jax.Array, grid: int, new_h: int, new_w: int) -> jax.Array:
  """Bicubic resize of a [grid*grid, D] raster position table to [new_h*new_w, D] (fp32)."""
  t = table.astype(jnp.float32).reshape(grid, grid, -1)
  out = jnp.einsum("hi,wj,ijd->hwd", bicubic_matrix(grid, new_h), bicubic_matrix(grid, new_w), t)
  return out.reshape(new_h * new_w, -1)


class VisionAttention(AttentionModule):
  """Bidirectional multi-head attention (no mask) with separate q/k/v/out projections, scale head_dim^-0.5.

  Keys and values come from `context` (default: `x` itself, i.e. self-attention).
  """

  def __init__(self, hidden: int, num_heads: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.scale = (hidden // num_heads)**-0.5
    self.implementation = "xla"
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(hidden, hidden, ("embed", "heads"), **kw)
    self.k_proj = linear(hidden, hidden, ("embed", "heads"), **kw)
    self.v_proj = linear(hidden, hidden, ("embed", "heads"), **kw)
    self.out_proj = linear(hidden, hidden, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    heads = ("batch", "length", "act_heads", None)
    q = constrain(split_heads(self.q_proj(x), self.num_heads), heads)
    k = constrain(split_heads(self.k_proj(context), self.num_heads), heads)
    v = constrain(split_heads(self.v_proj(context), self.num_heads), heads)
    return self.out_proj(merge_heads(self.attend(q, k, v, scale=self.scale)))


class VisionEncoder(LayerStack):
  """`num_layers` blocks made by `make_layer`, stacked and scanned; activations constrained between blocks."""

  def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    self.layers = stack_layers(make_layer, num_layers, rngs)
    self.remat_policy = "none"

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.run_layers(h)[0]


class SiglipMLP(nnx.Module):
  """fc2(gelu_tanh(fc1(x))), both linears biased."""

  def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = linear(hidden, intermediate, ("embed", "mlp"), **kw)
    self.fc2 = linear(intermediate, hidden, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = constrain(gelu_tanh(self.fc1(x)), ("batch", "length", "act_mlp"))
    return self.fc2(h)


class SiglipEmbeddings(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.grid = cfg.grid_size
    self.patch_size = cfg.patch_size
    self.patch_embedding = patch_conv(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = position_table(cfg, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
    h = patchify(self.patch_embedding, pixels)
    height, width = pixels.shape[1], pixels.shape[2]
    table = self.position_embedding[...]
    # As HF: resize only when asked and the grid differs from the table's or the image is not square.
    if interpolate_pos_encoding and (h.shape[1] != self.grid**2 or height != width):
      table = resize_positions(table, self.grid, height // self.patch_size, width // self.patch_size)
    return h + table.astype(h.dtype)


class SiglipEncoderLayer(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
    self.self_attn = VisionAttention(cfg.hidden_size, cfg.num_attention_heads, use_bias=True, rngs=rngs, **kw)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
    self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **kw)

  def __call__(self, h: jax.Array) -> jax.Array:
    h = h + self.self_attn(self.layer_norm1(h))
    return constrain(h + self.mlp(self.layer_norm2(h)), ACT)


class SiglipMAPHead(nnx.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then a residual LN+MLP."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    init = nnx.initializers.normal(cfg.hidden_size**-0.5)
    self.probe = nnx.Param(init(rngs.params(), (1, 1, cfg.hidden_size), param_dtype))
    self.attention = VisionAttention(cfg.hidden_size, cfg.num_attention_heads, use_bias=True, rngs=rngs, **kw)
    self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
    self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **kw)

  def __call__(self, h: jax.Array) -> jax.Array:
    probe = jnp.broadcast_to(self.probe[...].astype(h.dtype), (h.shape[0], 1, h.shape[-1]))
    x = self.attention(probe, context=h)
    x = x + self.mlp(self.layernorm(x))  # the residual is taken before the LayerNorm
    return x[:, 0]


class SiglipVisionTower(nnx.Module):
  """HF `SiglipVisionModel` on NHWC pixels [B, H, W, C]; returns tokens [B, (H/p)*(W/p), D]."""

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if cfg.kind != "siglip":
      raise ValueError(f"SiglipVisionTower needs vision.kind 'siglip', got {cfg.kind!r}")
    self.cfg = cfg
    self.dtype = to_dtype(dtype)
    kw = dict(dtype=self.dtype, param_dtype=to_dtype(param_dtype))
    self.embeddings = SiglipEmbeddings(cfg, rngs=rngs, **kw)
    self.encoder = VisionEncoder(lambda rngs: SiglipEncoderLayer(cfg, rngs=rngs, **kw), cfg.num_hidden_layers, rngs)
    self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
    if cfg.use_head:
      self.head = SiglipMAPHead(cfg, rngs=rngs, **kw)

  def _check(self, pixels: jax.Array, interpolate_pos_encoding: bool) -> None:
    if not interpolate_pos_encoding:
      check_pixels(pixels, self.cfg.image_size, self.cfg.num_channels, "SiglipVisionTower")
      return
    p = self.cfg.patch_size
    if pixels.ndim != 4 or pixels.shape[-1] != self.cfg.num_channels or pixels.shape[1] % p or pixels.shape[2] % p:
      raise ValueError(f"SiglipVisionTower with interpolate_pos_encoding expects NHWC pixels [B, H, W, "
                       f"{self.cfg.num_channels}] with H and W multiples of the patch size {p}, "
                       f"got shape {tuple(pixels.shape)}")

  def forward_features(self, pixels: jax.Array, interpolate_pos_encoding: bool = False) -> tuple[jax.Array, jax.Array]:
    """(pre_norm, post_norm), each [B, N, D]: the last block's output (HF `hidden_states[-1]`) and
    `post_layernorm` of it (HF `last_hidden_state`)."""
    self._check(pixels, interpolate_pos_encoding)
    h = self.embeddings(pixels.astype(self.dtype), interpolate_pos_encoding)
    h = self.encoder(constrain(h, ACT))
    return h, self.post_layernorm(h)

  def __call__(self, pixels: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
    return self.forward_features(pixels, interpolate_pos_encoding)[1]

  def pool(self, last_hidden_state: jax.Array) -> jax.Array:
    """MAP-head pooling of `last_hidden_state` [B, N, D] -> [B, D] (HF `pooler_output`)."""
    if not self.cfg.use_head:
      raise ValueError("this SigLIP tower was built without its MAP head (vision.use_head=False)")
    return self.head(last_hidden_state)
