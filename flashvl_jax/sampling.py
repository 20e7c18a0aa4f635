"""Generation: a preallocated KV cache, a jitted prefill and a `lax.while_loop` decode.

  sampler = sampling.Sampler(module)                      # FlashVL builds one: `model.sampler`
  tokens = sampling.generate(sampler, **processor(images, conversations, add_generation_prompt=True),
                             max_new_tokens=64)

How a call runs (`Sampler`):
- host: each row's real tokens (`attention_mask == 1`, right- or left-padded) are moved to the right end of a
  `[B, P]` block, P = `bucket_length(longest prompt)`, a power of two from 128, so every prompt length inside a
  bucket reuses one compiled prefill. The KV cache has `P + N` slots, N = `bucket_length(max_new_tokens, 32)`.
- prefill (one jit): image tiles are encoded and written at the placeholders (`embed_inputs`), the whole block
  runs through the LLM into cache slots [0, P) with per-row positions `max(cumsum(mask) - 1, 0)`, and the first
  token is sampled from the last position.
- decode (one jit, the carry donated): a `lax.while_loop` feeds back one token per step into slot P + step - 1
  until every row has produced a stop id or `max_new_tokens` tokens; the stop check never leaves the device.
  `max_new_tokens` is a traced bound, so it does not recompile within its bucket. Streaming runs the same loop
  in chunks of a few tokens.
The module is split once into graph and state (`nnx.split`) and the pure functions are jitted. Prefill and
decode run on the sampler's state (the module's variables when it was built) unless a call passes `state`: a
trainer hands in its current parameters that way (same structure, e.g. `nnx.merge_state(params, frozen)`)
instead of updating a shared module.

Returned ids follow transformers' `generate`: the new tokens of each row up to and including the first stop id
(absent when the row ran out of `max_new_tokens`). Sampling order is transformers' too: temperature, then
top-k, then top-p. The attention implementation is an argument of prefill (image encoding and prompt) and decode:
`attention='auto'` picks the per-head loop on CPU, cuDNN flash attention for a bf16/fp16 model's prefill on an
NVIDIA GPU, else XLA's all-heads path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax import sharding
from flashvl_jax.config import FlashVLConfig
from flashvl_jax.errors import UserError
from flashvl_jax.models.flashvl import FlashVLModel, check_image_placeholders
from flashvl_jax.models.layers import set_attention

DEFAULT_STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
MIN_PROMPT_BUCKET = 128
MIN_DECODE_BUCKET = 32
STOP_SLOTS = 8  # stop ids travel padded to this many (with -1), so changing them does not recompile
ATTENTION_CHOICES = ("auto", "xla", "looped", "cudnn")


class InvalidRequestError(UserError, ValueError):
  """Generation arguments or inputs the caller can fix (a bad sampling setting, a prompt over the limit, ...)."""


@flax.struct.dataclass
class Carry:
  """What prefill hands decode and each decode step the next (on the device; donated to decode)."""

  cache: dict[str, jax.Array]  # {"k", "v"}: [L, B, P + N, K, head_dim]
  tokens: jax.Array  # [B, N] int32: the new tokens so far, then zeros
  step: jax.Array  # () int32: how many of `tokens` exist
  done: jax.Array  # [B] bool: the row has sampled a stop id
  lengths: jax.Array  # [B] int32: each row's prompt length
  rng: jax.Array  # the sampling key; step i draws with fold_in(rng, i)


def bucket_length(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """The smallest power of two >= max(n, minimum): lengths in one bucket share compiled functions."""
  return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Greedy (`do_sample=False`) or sampling with temperature, top-k (0 = off) and top-p (1.0 = off)."""

  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.do_sample and not self.temperature > 0:
      raise InvalidRequestError(f"temperature must be > 0 when sampling, got {self.temperature}; use "
                                "do_sample=False for greedy decoding")
    if self.top_k < 0:
      raise InvalidRequestError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise InvalidRequestError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")

  def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(temperature, top_k, top_p) as traced scalars: changing them does not recompile."""
    return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)


def _first_max(logits: jax.Array) -> jax.Array:
  """The first index of the maximum over the last axis (argmax's rule), as a max and a min."""
  best = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  size = logits.shape[-1]
  return jnp.minimum(jnp.min(jnp.where(logits == best, index, size), axis=-1), size - 1)  # NaN rows: the last id


def greedy_tokens(logits: jax.Array) -> jax.Array:
  """`argmax` over the vocabulary (the first index of the maximum) of logits [B, V], as int32.

  XLA:CPU's argmax over 151,936 words is slow (5.4 ms for 16 rows on 2 cores). This takes the maximum of each
  chunk of the vocabulary, picks the first chunk holding the overall maximum, then the first maximum inside it:
  the same index, 25x faster there (0.2 ms), and no slower on accelerators.
  """
  batch, vocab = logits.shape
  chunk = next((c for c in range(min(vocab, 8192), 511, -1) if vocab % c == 0), vocab)
  if chunk == vocab:
    return _first_max(logits)
  chunks = logits.reshape(batch, vocab // chunk, chunk)
  which = _first_max(jnp.max(chunks, axis=-1))
  inside = _first_max(jnp.take_along_axis(chunks, which[:, None, None], axis=1)[:, 0])
  return which * chunk + inside


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """The logits [B, V] with those outside top-k (0 = off) and top-p (1 = off) set to -inf, in vocabulary order.

  The top token always stays; a token tied with the last one kept stays too. `top_k` / `top_p` are scalars or
  [B, 1] (one per row). The draw that follows is over the vocabulary in its own order, not in sorted order, so
  that logits equal up to rounding (another device layout) give the same token: in sorted order, two nearly
  equal logits that swap places would swap the tokens each position draws.
  """
  values = jax.lax.top_k(logits, logits.shape[-1])[0]  # a full descending sort
  rank = jnp.arange(logits.shape[-1])
  values = jnp.where((rank < top_k) | (top_k == 0), values, -jnp.inf)
  probs = jax.nn.softmax(values, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = ((mass_before < top_p) | (top_p >= 1)) & (values > -jnp.inf)
  threshold = jnp.min(jnp.where(kept, values, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                  do_sample: bool) -> jax.Array:
  """Next tokens [B] int32 from fp32 logits [B, V]: argmax, or a draw after temperature, top-k and top-p.

  The filters sort the vocabulary; with both off (top_k 0, top_p 1) the draw is straight from the logits.
  """
  if not do_sample:
    return greedy_tokens(logits)
  logits = logits / temperature
  use_filters = (top_k > 0) | (top_p < 1)
  logits = jax.lax.cond(use_filters, lambda x: filter_logits(x, top_k, top_p), lambda x: x, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A batch ready for prefill: left-aligned in a bucket, on device."""

  input_ids: jax.Array  # [B, P] int32, real tokens at the right end, 0 before them
  attention_mask: jax.Array  # [B, P] int32
  pixel_values: jax.Array | None  # None when no row holds an image
  image_patch_index: jax.Array | None
  lengths: np.ndarray  # [B] real tokens per row (host copy)
  decode_length: int  # N: decode slots in the cache and token buffer


def _left_align(input_ids: np.ndarray, attention_mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's real tokens, in order, moved to the right end of a [B, length] block."""
  ids = np.zeros((input_ids.shape[0], length), np.int32)
  mask = np.zeros_like(ids)
  for row, (row_ids, row_mask) in enumerate(zip(input_ids, attention_mask)):
    real = row_ids[row_mask.astype(bool)]
    ids[row, length - len(real):] = real
    mask[row, length - len(real):] = 1
  return ids, mask


def resolve_attention(config: FlashVLConfig, attention: str, *, decode: bool = False) -> str:
  """'auto' -> 'looped' on CPU (2-3x faster there: each score matrix stays in cache); for prefill on an NVIDIA
  GPU 'cudnn' when the model is bf16/fp16 and cuDNN takes its head sizes; else 'xla' (decode, one query per
  row, gains nothing from flash attention)."""
  if attention not in ATTENTION_CHOICES:
    raise InvalidRequestError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
  if attention != "auto":
    return attention
  if jax.default_backend() == "cpu":
    return "looped"
  half = config.dtype in ("bfloat16", "float16")
  vision = config.vision
  head_dims = (config.llm.head_dim, vision.hidden_size // vision.num_attention_heads)
  fits = all(d % 8 == 0 and d <= 128 for d in head_dims)
  return "cudnn" if jax.default_backend() == "gpu" and half and fits and not decode else "xla"


def stop_array(stop_ids: tuple[int, ...]) -> jax.Array:
  padded = np.full(max(STOP_SLOTS, len(stop_ids)), -1, np.int32)
  padded[:len(stop_ids)] = stop_ids
  return jnp.asarray(padded)


class Sampler:
  """Jitted prefill / decode for one `FlashVLModel`; compiled once per (batch, prompt bucket, decode bucket).

  `trace_counts['prefill' | 'decode']` counts traces (each is one compilation), for tests and benchmarks.
  """

  def __init__(self, module: FlashVLModel, mesh: jax.sharding.Mesh | None = None):
    self.config = module.config
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(module)
    self.trace_counts: collections.Counter[str] = collections.Counter()
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("decode_length", "do_sample", "attention"))
    self._decode = jax.jit(self._decode_fn, static_argnames=("do_sample", "attention"), donate_argnames=("carry",))

  def _use_mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _place(self, x: np.ndarray | None) -> jax.Array | None:
    """Host array -> device: split over the mesh's batch axes when they divide the batch, else replicated."""
    if x is None or self.mesh is None:
      return None if x is None else jnp.asarray(x)
    batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    spec = sharding.batch_sharding(self.mesh, x.ndim) if x.shape[0] % batch_devices == 0 else sharding.replicated(
        self.mesh)
    return jax.device_put(x, spec)

  def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_patch_index=None, *,
              max_new_tokens: int, max_length: int | None = None, num_image_tokens=None) -> Prompts:
    """Validates a batch on the host and lays it out for prefill (see the module docstring)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] == 0:
      raise InvalidRequestError(f"input_ids must be [batch, length] with batch >= 1, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
      raise InvalidRequestError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}")
    lengths = mask.astype(bool).sum(axis=1)
    if lengths.min() == 0:
      raise InvalidRequestError(f"rows {np.flatnonzero(lengths == 0).tolist()} have no tokens (attention_mask "
                                "all 0)")
    if max_new_tokens < 1:
      raise InvalidRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = max_length or self.config.llm.max_position_embeddings
    if lengths.max() + max_new_tokens > limit:
      raise InvalidRequestError(
          f"a prompt of {lengths.max()} tokens plus max_new_tokens={max_new_tokens} needs "
          f"{lengths.max() + max_new_tokens} positions but the limit is {limit} "
          f"({'max_length' if max_length else 'llm.max_position_embeddings'}); shorten the prompt or lower "
          "max_new_tokens")
    real = ids[mask.astype(bool)]
    vocab = self.config.llm.vocab_size
    if real.max() >= vocab:
      raise InvalidRequestError(f"input_ids hold id {real.max()} but the model's vocabulary has {vocab} ids; was "
                                "the prompt tokenized for another model?")
    has_image = bool((real < 0).any())
    if num_image_tokens is not None:
      check_image_placeholders(np.where(mask.astype(bool), ids, 0), num_image_tokens)
    if has_image and pixel_values is None:
      raise InvalidRequestError("input_ids hold image placeholders (ids < 0) but no pixel_values were given")
    aligned_ids, aligned_mask = _left_align(ids, mask, bucket_length(lengths.max()))
    pixels = index = None
    if has_image:
      pixels = np.asarray(pixel_values)
      index = None if image_patch_index is None else np.asarray(image_patch_index, np.int32)
    return Prompts(self._place(aligned_ids), self._place(aligned_mask), self._place(pixels), self._place(index),
                   lengths, bucket_length(max_new_tokens, MIN_DECODE_BUCKET))

  def _prefill_fn(self, state, input_ids, attention_mask, pixel_values, image_patch_index, rng, knobs, stop_ids, *,
                  decode_length: int, do_sample: bool, attention: str) -> Carry:
    self.trace_counts["prefill"] += 1
    model = nnx.merge(self.graphdef, state)
    set_attention(model, attention)  # image encoding and prompt
    batch, prompt_length = input_ids.shape
    embeds = model.embed_inputs(input_ids, pixel_values, image_patch_index)
    cache = model.llm.init_cache(batch, prompt_length + decode_length)
    cache = {k: sharding.constrain(v, (None, "batch", "length", "act_heads", None)) for k, v in cache.items()}
    slot_mask = jnp.concatenate([attention_mask, jnp.ones((batch, decode_length), attention_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    logits, cache = model.llm(inputs_embeds=embeds, attention_mask=slot_mask, position_ids=positions, cache=cache,
                              cache_index=0, logits_at=jnp.full((batch, 1), prompt_length - 1, jnp.int32))
    first = sample_tokens(logits[:, 0], jax.random.fold_in(rng, 0), *knobs, do_sample=do_sample)
    return Carry(cache=cache,
                 tokens=jnp.zeros((batch, decode_length), jnp.int32).at[:, 0].set(first),
                 step=jnp.int32(1),
                 done=jnp.isin(first, stop_ids),
                 lengths=attention_mask.sum(axis=1).astype(jnp.int32),
                 rng=rng)

  def _decode_fn(self, state, carry: Carry, limit, knobs, stop_ids, *, do_sample: bool, attention: str) -> Carry:
    self.trace_counts["decode"] += 1
    model = nnx.merge(self.graphdef, state)
    set_attention(model, attention)
    batch, decode_length = carry.tokens.shape
    cache_length = carry.cache["k"].shape[2]
    prompt_length = cache_length - decode_length
    slot_mask = jnp.arange(cache_length)[None, :] >= (prompt_length - carry.lengths)[:, None]

    def step_fn(c: Carry) -> Carry:
      step = c.step
      previous = jax.lax.dynamic_slice_in_dim(c.tokens, step - 1, 1, axis=1)
      logits, cache = model.llm(previous, attention_mask=slot_mask, position_ids=(c.lengths + step - 1)[:, None],
                                cache=c.cache, cache_index=prompt_length + step - 1)
      cache = {k: sharding.constrain(v, (None, "batch", "length", "act_heads", None)) for k, v in cache.items()}
      token = sample_tokens(logits[:, -1], jax.random.fold_in(c.rng, step), *knobs, do_sample=do_sample)
      tokens = jax.lax.dynamic_update_slice(c.tokens, token[:, None], (jnp.int32(0), step))
      return c.replace(cache=cache, tokens=tokens, step=step + 1, done=c.done | jnp.isin(token, stop_ids))

    keep_going = lambda c: (c.step < limit) & ~jnp.all(c.done)
    return jax.lax.while_loop(keep_going, step_fn, carry)

  def prefill(self, prompts: Prompts, params: SamplingParams, *, seed: int = 0, stop_ids=DEFAULT_STOP_IDS,
              attention: str = "auto", state: nnx.State | None = None) -> Carry:
    """Encodes images, fills the cache with the prompts and samples each row's first token (asynchronously), with
    the variables `state` (default: the sampler's own)."""
    with self._use_mesh():
      return self._prefill(self.state if state is None else state, prompts.input_ids, prompts.attention_mask,
                           prompts.pixel_values, prompts.image_patch_index, jax.random.key(seed), params.arrays(), stop_array(stop_ids),
                           decode_length=prompts.decode_length, do_sample=params.do_sample,
                           attention=resolve_attention(self.config, attention))

  def decode(self, carry: Carry, limit: int, params: SamplingParams, *, stop_ids=DEFAULT_STOP_IDS,
             attention: str = "auto", state: nnx.State | None = None) -> Carry:
    """Runs the decode loop until every row is done or `limit` tokens exist; `carry` is consumed. Pass the
    `state` the prefill used."""
    if limit > carry.tokens.shape[1]:
      raise ValueError(f"limit {limit} exceeds the {carry.tokens.shape[1]} decode slots of this carry")
    with self._use_mesh():
      return self._decode(self.state if state is None else state, carry, jnp.int32(limit), params.arrays(),
                          stop_array(stop_ids), do_sample=params.do_sample, attention=resolve_attention(self.config, attention, decode=True))


def _trim(tokens: np.ndarray, stop_ids) -> list[int]:
  """A row's tokens up to and including its first stop id."""
  stops = np.flatnonzero(np.isin(tokens, stop_ids))
  return tokens[:stops[0] + 1 if stops.size else len(tokens)].tolist()


def stream(sampler: Sampler, *, input_ids, pixel_values=None, image_patch_index=None, attention_mask=None,
           max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, stop_ids=None, max_length: int | None = None,
           attention: str = "auto", chunk_size: int = 8, num_image_tokens=None, tile_mask=None,
           loss_mask=None, state: nnx.State | None = None) -> Iterator[list[list[int]]]:
  """Like `generate`, but yields each row's new tokens as they come: the first token right after prefill, then
  chunks of up to `chunk_size` tokens (one jitted decode call each). A row yields nothing after its stop id."""
  del tile_mask, loss_mask  # accepted so that `stream(sampler, **processor(...))` works
  stop_ids = tuple(DEFAULT_STOP_IDS if stop_ids is None else stop_ids)
  params = SamplingParams(do_sample, temperature, top_k, top_p)
  prompts = sampler.prepare(input_ids, attention_mask, pixel_values, image_patch_index,
                            max_new_tokens=max_new_tokens, max_length=max_length, num_image_tokens=num_image_tokens)
  carry = sampler.prefill(prompts, params, seed=seed, stop_ids=stop_ids, attention=attention, state=state)
  emitted, finished = 0, np.zeros(len(prompts.lengths), bool)
  while True:
    step, tokens = jax.device_get((carry.step, carry.tokens))
    chunk = []
    for row in range(len(finished)):
      new = [] if finished[row] else _trim(tokens[row, emitted:step], stop_ids)
      finished[row] |= bool(new) and new[-1] in stop_ids
      chunk.append(new)
    emitted = int(step)
    yield chunk
    if finished.all() or emitted >= max_new_tokens:
      return
    carry = sampler.decode(carry, min(emitted + chunk_size, max_new_tokens), params, stop_ids=stop_ids,
                           attention=attention, state=state)


def generate(sampler: Sampler, *, input_ids, pixel_values=None, image_patch_index=None, attention_mask=None,
             max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_ids=None, max_length: int | None = None,
             attention: str = "auto", num_image_tokens=None, tile_mask=None, loss_mask=None,
             state: nnx.State | None = None) -> list[list[int]]:
  """New token ids per row: up to and including the first stop id, at most `max_new_tokens`.

  input_ids / attention_mask: [B, L] prompts, padded on either side (the `Processor` pads right); image
    positions hold the placeholders (ids < 0). pixel_values [B, n_tiles, S, S, 3] (uint8 or normalised) and
    image_patch_index [B, T_img, f*f] as the `Processor` makes them; `num_image_tokens`, when given, is checked
    against the placeholders. `tile_mask` and `loss_mask` are accepted and unused, so that
    `generate(sampler, **processor(...))` works.
  do_sample / temperature / top_k / top_p / seed: greedy by default; see `SamplingParams`.
  stop_ids: ids that end a row (default <|im_end|>, <|endoftext|>); `()` generates exactly max_new_tokens.
  max_length: the limit on prompt + new tokens (default `llm.max_position_embeddings`); over it is an error.
  attention: 'auto' | 'xla' | 'looped' | 'cudnn' for prefill and decode (see `resolve_attention`).
  state: the variables to generate with (default: the sampler's own).
  """
  rows = [[] for _ in range(len(input_ids))]
  for chunk in stream(sampler, input_ids=input_ids, pixel_values=pixel_values, image_patch_index=image_patch_index,
                      attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
                      max_length=max_length, attention=attention, chunk_size=max_new_tokens,
                      num_image_tokens=num_image_tokens, state=state):
    for row, new in zip(rows, chunk):
      row.extend(new)
  return rows
