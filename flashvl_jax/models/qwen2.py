"""Qwen2 / Qwen2.5 causal LM (HF `Qwen2ForCausalLM`) in Flax NNX, with a static KV cache for sampling.

Module paths mirror the HF names, with the decoder layers stacked: HF `model.layers.{i}.self_attn.q_proj.weight`
is slice i of our `model.layers.self_attn.q_proj.kernel` [L, in, out], so the weight table in
`flashvl_jax.weights.qwen2` is a near one-to-one list. The layers run as one `lax.scan` (`layers.LayerStack`).

Three ways to run it, all with static shapes:
- plain: `model(input_ids, attention_mask=mask)`; `mask` [B, T] marks real tokens (keys only, combined with
  the causal rule). With left padding pass `position_ids = max(cumsum(mask) - 1, 0)`, as HF's `generate` does;
  the default is `arange(T)` for every row.
- packed: `segment_ids` [B, T] (0 = padding) restrict attention to keys of the same segment; pass
  per-segment `position_ids` that restart at 0.
- cached: `model(ids, cache=cache, cache_index=i, attention_mask=slot_mask, position_ids=pos)` writes the
  new tokens' keys/values at cache slots [i, i + T) of every row and attends over all slots (the cache is
  [L, ...] and each scanned layer receives and returns its own slice): slot s is
  visible to query t when `slot_mask[b, s]` and `s <= i + t`. A left-padded batch shares the write index
  and carries its padding in `slot_mask` and its per-row positions in `position_ids`, which is exact for
  prompts of mixed length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flashvl_jax.config import LLMConfig
from flashvl_jax.models.layers import (AttentionModule, LayerStack, RMSNorm, SwiGLU, apply_rope, linear, merge_heads,
                                       rope_cos_sin, split_heads, stack_layers, to_dtype)
from flashvl_jax.sharding import constrain

KVCache = dict[str, jax.Array]  # {"k": [L, B, S, K, hd], "v": [L, B, S, K, hd]}
LayerCache = tuple[jax.Array, jax.Array]  # one layer's (k, v), each [B, S, K, hd]


def write_cache(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
  """`new` [B, T, K, hd] written into layer `layer` of `cache` [L, B, S, K, hd] at slots [index, index + T): one
  index for every row (a scalar), or one per row ([B], the continuous-batching engine's slots). In place."""
  index, zero = jnp.asarray(index, jnp.int32), jnp.int32(0)
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice(cache, new[None], (layer, zero, index, zero, zero))
  rows = jnp.arange(new.shape[0], dtype=jnp.int32)
  return cache.at[layer, rows[:, None], index[:, None] + jnp.arange(new.shape[1], dtype=jnp.int32)[None]].set(new)


class Qwen2Attention(AttentionModule):
  """GQA self-attention: q/k/v projections with bias, o_proj without; RoPE on q and k."""

  def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    self.implementation = "xla"
    d, q_out, kv_out = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(d, q_out, ("embed", "heads"), use_bias=True, **kw)
    self.k_proj = linear(d, kv_out, ("embed", "kv_heads"), use_bias=True, **kw)
    self.v_proj = linear(d, kv_out, ("embed", "kv_heads"), use_bias=True, **kw)
    self.o_proj = linear(q_out, d, ("heads", "embed"), use_bias=False, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
               cache: LayerCache | None = None, layer_index: jax.Array | None = None,
               cache_index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x [B, T, D] -> ([B, T, D], updated (k, v) or None).

    cache: this layer's (k, v) [B, S, K, hd]; the new keys/values go to slots [cache_index, cache_index + T)
    and attention runs over all S slots.
    """
    q = apply_rope(split_heads(self.q_proj(x), self.num_heads), cos, sin)
    k = apply_rope(split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)
    v = split_heads(self.v_proj(x), self.num_kv_heads)
    if cache is not None:
      cache = tuple(write_cache(c, new.astype(c.dtype), layer_index, cache_index) for c, new in zip(cache, (k, v)))
      k, v = (jax.lax.dynamic_index_in_dim(c, layer_index, 0, keepdims=False).astype(q.dtype) for c in cache)
    out = self.attend(q, k, v, scale=self.head_dim**-0.5, mask=mask)
    return self.o_proj(merge_heads(out)), cache


class Qwen2DecoderLayer(nnx.Module):
  """Pre-norm block: `h += attn(RMS(h))`, then `h += mlp(RMS(h))`."""

  def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm_kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
    self.self_attn = Qwen2Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h: jax.Array, cache: LayerCache | None = None, *, cos: jax.Array, sin: jax.Array,
               mask: jax.Array, layer_index: jax.Array | None = None,
               cache_index: jax.Array | None = None) -> jax.Array | tuple[jax.Array, LayerCache]:
    attn_out, new_cache = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache=cache,
                                         layer_index=layer_index, cache_index=cache_index)
    h = h + attn_out
    h = h + self.mlp(self.post_attention_layernorm(h))
    h = constrain(h, ("batch", "length", "act_embed"))
    return h if cache is None else (h, new_cache)


class Qwen2Model(LayerStack):
  """Token embedding, the stacked decoder layers and the final RMSNorm (HF `Qwen2Model`)."""

  def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    self.layers = stack_layers(lambda rngs: Qwen2DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                               cfg.num_hidden_layers, rngs)
    self.remat_policy = "none"
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


def _attention_mask(q_len: int, kv_len: int, query_offset: jax.Array | int, attention_mask: jax.Array | None,
                    segment_ids: jax.Array | None) -> jax.Array:
  """Boolean [B or 1, 1, T, S]: causal by slot index (`s <= offset + t`; the offset a scalar or one per row),
  key padding, same segment."""
  offset = jnp.reshape(jnp.asarray(query_offset, jnp.int32), (-1, 1, 1))
  q_slot = offset + jnp.arange(q_len, dtype=jnp.int32)[:, None]
  mask = (jnp.arange(kv_len, dtype=jnp.int32)[None, None, :] <= q_slot)[:, None]
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, None, :]
  if segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    mask = mask & same[:, None]
  return mask


class Qwen2ForCausalLM(nnx.Module):
  """Qwen2 decoder with an LM head; `lm_head` exists only when embeddings are not tied."""

  def __init__(self, cfg: LLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    dtype, param_dtype = to_dtype(dtype), to_dtype(param_dtype)
    self.config = cfg
    self.dtype = dtype
    self.model = Qwen2Model(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] in the compute dtype (ids must be valid vocab ids)."""
    return self.model.embed_tokens(input_ids)

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """Final hidden states [B, T, D] -> fp32 logits [B, T, V] (accumulated in fp32)."""
    if self.config.tie_word_embeddings:
      weight = self.model.embed_tokens.embedding[...].astype(h.dtype)  # [V, D]
      logits = jnp.einsum("btd,vd->btv", h, weight, preferred_element_type=jnp.float32)
    else:
      weight = self.lm_head.kernel[...].astype(h.dtype)  # [D, V]
      logits = jnp.einsum("btd,dv->btv", h, weight, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """A zeroed KV cache {"k", "v"}: [layers, batch, max_len, kv_heads, head_dim] each (compute dtype by default)."""
    cfg = self.config
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = self.dtype if dtype is None else to_dtype(dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def __call__(self,
               input_ids: jax.Array | None = None,
               *,
               inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               cache: KVCache | None = None,
               cache_index: jax.Array | int | None = None,
               logits_at: jax.Array | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (fp32), or `(logits, new_cache)` when `cache` is given.

    attention_mask: [B, T] without a cache, [B, S] over cache slots with one (1 = a valid key).
    position_ids: [B, T]; default `arange(T)` (plus `cache_index` with a cache). With left padding pass
      `max(cumsum(mask) - 1, 0)`.
    segment_ids: [B, T] packed sequences (0 = padding); not combinable with a cache.
    cache / cache_index: see the module docstring; `cache_index` may be a traced int32 scalar, or [B] (each row
      writes at its own slot), and `cache_index + T` must not exceed the cache length (`dynamic_update_slice`
      would clamp the write).
    logits_at: [B, K] positions to compute logits at (default: all T); the logits are then [B, K, V]. Saves
      the LM head and its [B, T, V] output when only some positions are scored (training on answers).
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    h = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(self.dtype)
    b, t = h.shape[:2]
    if cache is None:
      if cache_index is not None:
        raise ValueError("cache_index needs a cache; build one with init_cache(batch, max_len)")
      kv_len, offset = t, 0
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
      if cache_index is None:
        raise ValueError("a cache needs cache_index: the first slot the new tokens are written to")
      kv_len, offset = cache["k"].shape[2], jnp.asarray(cache_index, jnp.int32)
    if attention_mask is not None and attention_mask.shape != (b, kv_len):
      what = "cache slots [B, S]" if cache is not None else "tokens [B, T]"
      raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must cover the {what} "
                       f"= {(b, kv_len)}")
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.reshape(offset, (-1, 1)) + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = _attention_mask(t, kv_len, offset, attention_mask, segment_ids)
    cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)

    h = constrain(h, ("batch", "length", "act_embed"))
    kv = None if cache is None else (cache["k"], cache["v"])
    h, kv = self.model.run_layers(h, kv, cos=cos, sin=sin, mask=mask, cache_index=offset)
    h = self.model.norm(h)
    if logits_at is not None:
      h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
    logits = self.logits_from_hidden(h)
    if cache is None:
      return logits
    return logits, {"k": kv[0], "v": kv[1]}
