"""Building blocks shared by the towers: dense layers with logical sharding, norms, attention, RoPE, MLPs.

Exactness rules (what parity with transformers needs): norms and softmax compute in fp32; RMSNorm casts back to the
input dtype *before* multiplying by its weight (HF order); RoPE angles are fp32 and cos/sin are cast to
the activation dtype; GQA maps query head h to KV head h // group (HF `repeat_kv`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flashvl_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name_or_dtype) -> jnp.dtype:
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name_or_dtype])
  return jnp.dtype(name_or_dtype)


class Linear(nnx.Linear):
  """`nnx.Linear` plus an optional low-rank update: `y = x W + b + lora(x)` when `lora` is set.

  `lora` is None in every model as built; `flashvl_jax.train.lora.add_lora` attaches an adapter module (any
  module mapping `x` to the update), so the model code never depends on the trainer.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.lora: nnx.Module | None = nnx.data(None)  # data, so an adapter can be attached later

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(x, out_sharding)
    return y if self.lora is None else y + self.lora(x).astype(y.dtype)


def linear(in_features: int, out_features: int, axes: tuple[str, str], *, use_bias: bool, dtype, param_dtype,
           rngs: nnx.Rngs) -> Linear:
  """`Linear` (kernel `[in, out]` = PyTorch `W.T`) whose kernel/bias carry logical sharding names."""
  return Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
      rngs=rngs,
  )


class LayerNorm(nnx.Module):
  """LayerNorm with biased variance, computed in fp32 (torch semantics)."""

  def __init__(self, features: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """HF RMSNorm: fp32 `x * rsqrt(mean(x^2) + eps)`, cast to the input dtype, then times the weight."""

  def __init__(self, features: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)).astype(x.dtype)
    return (self.scale[...].astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


ATTENTION_IMPLEMENTATIONS = ("xla", "looped", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, mask: jax.Array | None = None,
              implementation: str = "xla") -> jax.Array:
  """Scaled dot-product attention with grouped KV heads, fp32 softmax.

  q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (query head h reads KV head h // (H // K));
  mask: boolean, broadcastable to [B, H, T, S] (or [B, 1, T, S]); True = attend. A fully masked row
  attends uniformly (as HF's finite `finfo.min` mask does), never NaN.
  implementation: 'xla' (all heads at once, every platform), 'looped' (the same maths one (batch, KV head) pair
    at a time, so each score matrix stays in cache: 2-3x faster on CPU, serial on accelerators) or 'cudnn'
    (cuDNN flash attention via `jax.nn.dot_product_attention`: NVIDIA GPUs, bf16/fp16, head_dim a multiple of 8
    up to 128).
  Returns [B, T, H, D] in q's dtype.
  """
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}")
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, kv_heads, group, t, s)  # [B, K|1, G|1, T, S]
  qg = q.reshape(b, t, kv_heads, group, d)
  if implementation == "xla":
    out = _grouped_attention(qg, k, v, scale, mask, "btkgd,bskd->bkgts", "bkgts,bskd->btkgd")
    return out.reshape(b, t, h, d)

  # Pairs on the leading axis, each slice contiguous: [B*K, G, T, D] queries, [B*K, S, D] keys and values.
  pairs = lambda x: x.reshape(b * kv_heads, *x.shape[2:])
  qs = pairs(qg.transpose(0, 2, 3, 1, 4))
  ks, vs = (pairs(x.transpose(0, 2, 1, 3)) for x in (k, v))
  ms = None if mask is None else pairs(jnp.broadcast_to(mask, (b, kv_heads, *mask.shape[2:])))

  def one_pair(xs):
    q1, k1, v1, m1 = xs
    return _grouped_attention(q1, k1, v1, scale, m1, "gtd,sd->gts", "gts,sd->gtd")

  out = jax.lax.map(one_pair, (qs, ks, vs, ms))  # [B*K, G, T, D]
  return out.reshape(b, kv_heads, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _grouped_attention(q, k, v, scale, mask, scores_eq: str, out_eq: str):
  scores = jnp.einsum(scores_eq, q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum(out_eq, probs, v)


class AttentionModule(nnx.Module):
  """Base of the towers' attention layers: `attend` runs `attention` with the module's `implementation`, an
  `ATTENTION_IMPLEMENTATIONS` name set before tracing (by `set_attention`); each subclass starts at 'xla'."""

  implementation: str

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
             mask: jax.Array | None = None) -> jax.Array:
    return attention(q, k, v, scale=scale, mask=mask, implementation=self.implementation)


def set_attention(model: nnx.Module, implementation: str) -> None:
  """Sets the attention implementation of every `AttentionModule` in `model` (vision tower and LLM)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}")
  for _, module in nnx.iter_modules(model):
    if isinstance(module, AttentionModule):
      module.implementation = implementation


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
  """HF default RoPE tables for integer `positions` [B, T]: fp32 angles, cast to `dtype`. Each [B, T, D]."""
  inv_freq = 1.0 / (theta**(jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Split-halves rotation (`rotate_half`) of x [B, T, H, D] by cos/sin [B, T, D]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class SwiGLU(nnx.Module):
  """`down(silu(gate(x)) * up(x))` without biases (Qwen2 MLP and AIMv2 FFN)."""

  def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = False):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(hidden, intermediate, ("embed", "mlp"), **kw)
    self.up_proj = linear(hidden, intermediate, ("embed", "mlp"), **kw)
    self.down_proj = linear(intermediate, hidden, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self.down_proj(h)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """[B, T, H*D] -> [B, T, H, D]."""
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, T, H, D] -> [B, T, H*D]."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def check_pixels(pixels: jax.Array, image_size: int, channels: int, name: str) -> None:
  if pixels.ndim != 4 or pixels.shape[-1] != channels:
    raise ValueError(f"{name} expects NHWC pixels [B, H, W, {channels}], got shape {tuple(pixels.shape)}")
  if pixels.shape[1] != image_size or pixels.shape[2] != image_size:
    raise ValueError(f"{name} expects {image_size}x{image_size} images, got {pixels.shape[1]}x{pixels.shape[2]}")



# ---------------------------------------------------------------------------------------------------------------
# Stacked layers

LAYER_AXIS = "layers"  # logical name of the leading axis of stacked per-layer parameters
REMAT_ALIASES = {"full": "nothing_saveable",  # keep only each layer's input, recompute the rest
                 "dots": "dots_with_no_batch_dims_saveable"}  # keep the weight-matmul outputs
REMAT_POLICY_NAMES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                      "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
REMAT_CHOICES = ("none", *REMAT_ALIASES, *REMAT_POLICY_NAMES)


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy for a config name: 'none' (no remat: None), 'full', 'dots', or the name of a
  `jax.checkpoint_policies` policy."""
  if name not in REMAT_CHOICES:
    raise ValueError(f"unknown remat policy {name!r}; use one of {', '.join(REMAT_CHOICES)}")
  if name == "none":
    return None
  return getattr(jax.checkpoint_policies, REMAT_ALIASES.get(name, name))


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """One module whose every parameter has a leading `num_layers` axis (logical name 'layers'): layer i is the
  i-th slice. Each layer is initialised from its own split of `rngs`."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
  def build(rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(rngs)

  return build(rngs)


class LayerStack(nnx.Module):
  """A module whose `layers` are stacked (`stack_layers`) and run in order by one `lax.scan`.

  The scan traces and compiles one layer whatever the depth. `remat_policy` (a `REMAT_CHOICES` name, set before
  tracing, e.g. by `set_remat`) rematerialises each layer inside the scanned body.
  """

  layers: nnx.Module
  remat_policy: str  # set to "none" by each subclass's __init__

  def run_layers(self, h: jax.Array, carried: Any = None, **kwargs) -> tuple[jax.Array, Any]:
    """Runs layer i = 0..L-1 as `h = layer_i(h, **kwargs)`, or as `h, carried = layer_i(h, carried,
    layer_index=i, **kwargs)` when `carried` (a pytree of [L, ...] arrays: a KV cache) is given; returns
    (h, carried or None).

    `carried` travels whole in the scan's carry and layer i updates its own slice in place.
    """
    graphdef, state = nnx.split(self.layers)

    def body(carry, xs):
      h, carried = carry
      layer_state, index = xs
      layer = nnx.merge(graphdef, layer_state)
      if carried is None:
        return (layer(h, **kwargs), None), None
      return layer(h, carried, layer_index=index, **kwargs), None

    policy = remat_policy(self.remat_policy)
    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    (h, carried), _ = jax.lax.scan(body, (h, carried), (state, jnp.arange(num_layers, dtype=jnp.int32)))
    return h, carried


def set_remat(model: nnx.Module, policy: str) -> None:
  """Sets the rematerialisation policy of every `LayerStack` in `model` (vision tower and LLM)."""
  remat_policy(policy)  # validates the name
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LayerStack):
      module.remat_policy = policy
