"""Continuous batching: a fixed number of decode slots over one preallocated KV cache, fed by a host loop.

  engine = Engine(model.module, slots=16, max_seq_len=2048, stop_ids=model.tokenizer.eos_ids)
  engine.warmup()                      # compiles every prompt bucket, with and without an image
  engine.start()                       # the host loop runs in a thread
  engine.submit(Request("r1", prompt_ids, max_new_tokens=64, on_tokens=callback))

How it runs:
- The device holds `Slots`: a KV cache [L, S, C, K, hd] for S slots of C positions each, the token each slot
  feeds next, how many cache entries it has filled, its sampling settings and budget, split over the mesh's batch
  axes (`slot_axes`: each device holds its share of the slots). Every function below donates it, so the cache is
  updated in place.
- Admission (one jit per prompt bucket, with or without an image): a request's prompt, right-padded to a
  power-of-two bucket, runs through the vision tower and the LLM into a scratch cache of the bucket's length;
  its first token is sampled and the scratch cache is copied into a free slot's first positions. The other
  slots are untouched.
- Decode (one jit per width): `decode_steps` steps for the first `width` slots at once (a power of two covering
  every busy slot; requests take the lowest free slot, so at low load only a few slots run); each slot writes at
  its own cache position (`Qwen2ForCausalLM` takes a per-row `cache_index`), attends to its own filled entries,
  samples with its own settings and key, and stops at a stop id or its budget on the device. The host only
  reads the new tokens.
- The host loop admits queued requests into free slots, runs decode while any slot is busy, hands each request
  its tokens (`Request.on_tokens`) and frees a slot the moment its request finishes or is cancelled.
Sampling settings and budgets are traced arrays, so any mix of them shares the compiled functions: after
`warmup`, serving compiles nothing (`trace_counts` counts traces).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.layers import set_attention
from flashvl_jax.preprocess.tiling import max_image_tokens, max_tiles
from flashvl_jax.sampling import (DEFAULT_STOP_IDS, STOP_SLOTS, InvalidRequestError, SamplingParams, bucket_length,
                                  filter_logits, greedy_tokens, resolve_attention, stop_array)
from flashvl_jax.sharding import constrain, logical_to_spec

logger = logging.getLogger(__name__)

# finish reasons handed to `Request.on_tokens` ('error': the engine failed; the log has the traceback)
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class QueueFullError(InvalidRequestError):
  """The engine's queue holds `max_queue` requests already; retry later."""


@dataclasses.dataclass
class Request:
  """One prompt to complete.

  input_ids: the prompt's token ids [n] (image placeholders < 0 included), e.g. a `Processor` row cut to its
    attention mask. pixel_values / image_patch_index: that row's image arrays, or None for text only.
  on_tokens(new_ids, finish_reason): called from the engine's thread with each batch of new ids, the last time
    with finish_reason 'stop' (a stop id, included in new_ids), 'length' (max_new_tokens reached) or
    'cancelled'; None before that.
  """

  request_id: str
  input_ids: np.ndarray
  max_new_tokens: int
  on_tokens: Callable[[list[int], str | None], None]
  pixel_values: np.ndarray | None = None
  image_patch_index: np.ndarray | None = None
  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
  generated: int = 0


@flax.struct.dataclass
class Slots:
  """The decode slots on the device."""

  cache: dict[str, jax.Array]  # {"k", "v"}: [L, S, C, K, hd]
  last: jax.Array  # [S] int32: the token each slot feeds next
  length: jax.Array  # [S] int32: cache entries filled (= the position of `last`)
  generated: jax.Array  # [S] int32: tokens produced so far
  budget: jax.Array  # [S] int32: max_new_tokens
  active: jax.Array  # [S] bool: still generating
  temperature: jax.Array  # [S] float32
  top_k: jax.Array  # [S] int32
  top_p: jax.Array  # [S] float32
  greedy: jax.Array  # [S] bool
  key: jax.Array  # [S, 2] uint32: each slot's key data; token i draws with fold_in(key, i)


def slot_axes(slots: Slots) -> Slots:
  """The logical axes of every field: slots on 'batch' (split over 'data' and 'fsdp'), KV heads on 'act_heads'
  ('tensor'), so that each device holds and decodes its share of the slots, not a copy of all."""
  per_slot = {f.name: ("batch",) + (None,) * (len(getattr(slots, f.name).shape) - 1)
              for f in dataclasses.fields(slots) if f.name != "cache"}
  return slots.replace(cache={k: (None, "batch", "length", "act_heads", None) for k in slots.cache}, **per_slot)


def constrain_slots(slots: Slots) -> Slots:
  """The slots laid out by `slot_axes` under the ambient mesh (without one, as they are)."""
  return jax.tree.map(constrain, slots, slot_axes(slots), is_leaf=lambda x: isinstance(x, jax.Array))


def sample_slots(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                 greedy: jax.Array) -> jax.Array:
  """Next tokens [S] from logits [S, V] with per-slot settings (as `sampling.sample_tokens` row by row)."""
  argmax = greedy_tokens(logits)

  def draw(_):
    scaled = logits / temperature[:, None]
    # the filters sort the vocabulary of every row (slow on CPU): only when some slot asks for them
    filtered = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)),
                            lambda x: filter_logits(x, top_k[:, None], top_p[:, None]), lambda x: x, scaled)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

  sampled = jax.lax.cond(jnp.all(greedy), lambda _: argmax, draw, None)
  return jnp.where(greedy, argmax, sampled)


class Engine:
  """Continuous batching over `slots` decode slots of `max_seq_len` positions (prompt + new tokens) each.

  module: the model (its variables are split once). stop_ids: ids that end a request (the tokenizer's `eos_ids`).
  decode_steps: tokens each slot produces per decode call (the host sees new tokens this often).
  max_queue: requests waiting for a slot; `submit` beyond it raises `QueueFullError`.
  allocate=False: no device memory (no slots); such an engine only `lower`s its functions, e.g. for a TPU
  topology this host does not have.
  """

  def __init__(self, module: FlashVLModel, *, slots: int = 8, max_seq_len: int = 2048,
               stop_ids: tuple[int, ...] = DEFAULT_STOP_IDS, mesh: jax.sharding.Mesh | None = None,
               attention: str = "auto", decode_steps: int = 4, max_queue: int = 256, allocate: bool = True):
    if slots < 1 or max_seq_len < 2 or decode_steps < 1:
      raise ValueError(f"slots ({slots}), decode_steps ({decode_steps}) must be >= 1 and max_seq_len "
                       f"({max_seq_len}) >= 2")
    self.config = module.config
    self.num_slots, self.max_seq_len, self.decode_steps, self.max_queue = slots, max_seq_len, decode_steps, max_queue
    self.stop_ids = tuple(stop_ids)
    self.mesh = mesh
    self.prefill_attention = resolve_attention(self.config, attention)
    self.decode_attention = resolve_attention(self.config, attention, decode=True)
    self.graphdef, self.state = nnx.split(module)
    self.trace_counts: collections.Counter[str] = collections.Counter()
    self._admit = jax.jit(self._admit_fn, donate_argnames=("slots",))
    self._decode = jax.jit(self._decode_fn, static_argnames=("width",), donate_argnames=("slots",))
    self._slots = self._empty_slots() if allocate else None
    self._requests: list[Request | None] = [None] * slots
    self._queue: collections.deque[Request] = collections.deque()
    self._cancelled: set[str] = set()
    self._lock = threading.Condition()
    self._thread: threading.Thread | None = None
    self._running = False

  # ---- device functions ----------------------------------------------------------------------------------

  def _use_mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _new_slots(self) -> Slots:
    llm = self.config.llm
    shape = (llm.num_hidden_layers, self.num_slots, self.max_seq_len, llm.num_key_value_heads, llm.head_dim)
    dtype = jnp.dtype(self.config.dtype)
    zeros = lambda dtype_: jnp.zeros((self.num_slots,), dtype_)
    return constrain_slots(Slots(
        cache={"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}, last=zeros(jnp.int32),
        length=zeros(jnp.int32), generated=zeros(jnp.int32), budget=zeros(jnp.int32), active=zeros(bool),
        temperature=jnp.ones((self.num_slots,), jnp.float32), top_k=zeros(jnp.int32),
        top_p=jnp.ones((self.num_slots,), jnp.float32), greedy=jnp.ones((self.num_slots,), bool),
        key=jnp.zeros((self.num_slots, 2), jnp.uint32)))

  def _empty_slots(self) -> Slots:
    with self._use_mesh():
      return jax.jit(self._new_slots)()

  def _shape(self, shape: tuple[int, ...], dtype, names: tuple | None = None) -> jax.ShapeDtypeStruct:
    """An argument's shape for `lower`: laid out by its logical `names` on the mesh (None: replicated)."""
    if self.mesh is None:
      return jax.ShapeDtypeStruct(shape, dtype)
    spec = logical_to_spec(names, shape, self.mesh) if names else jax.sharding.PartitionSpec()
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(self.mesh, spec))

  def lower(self, state: Any, *, prompt_length: int, image: bool) -> tuple[Any, Any]:
    """(admission of one prompt of `prompt_length` tokens, with an image or without; a decode call of every
    slot), lowered from shapes alone: `state` may hold `jax.ShapeDtypeStruct`s with shardings."""
    shapes = jax.eval_shape(self._new_slots)
    slots = jax.tree.map(lambda x, names: self._shape(x.shape, x.dtype, names), shapes, slot_axes(shapes),
                         is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    cfg, scalar = self.config, lambda dtype: self._shape((), dtype)
    pixels = index = None
    if image:
      side, f = cfg.vision.image_size, cfg.adapter.shuffle_factor
      pixels = self._shape((1, max_tiles(cfg), side, side, 3), jnp.uint8)
      index = self._shape((1, max_image_tokens(cfg), f * f), jnp.int32)
    stop_ids = self._shape((STOP_SLOTS,), jnp.int32)
    with self._use_mesh():
      admit = self._admit.lower(state, slots, self._shape((1, prompt_length), jnp.int32), scalar(jnp.int32), pixels,
                                index, scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.int32),
                                scalar(jnp.float32), scalar(jnp.bool_), self._shape((2,), jnp.uint32), stop_ids)
      decode = self._decode.lower(state, slots, self._shape((self.num_slots,), jnp.bool_), stop_ids,
                                  width=self.num_slots)
    return admit, decode

  def _admit_fn(self, state, slots: Slots, input_ids, length, pixel_values, image_patch_index, slot, budget,
                temperature, top_k, top_p, greedy, key, stop_ids) -> tuple[Slots, jax.Array]:
    """Prefills one right-padded prompt [1, P] into slot `slot`; returns the slots and its first token."""
    self.trace_counts["admit"] += 1
    model = nnx.merge(self.graphdef, state)
    set_attention(model, self.prefill_attention)
    prompt_length = input_ids.shape[1]
    embeds = model.embed_inputs(input_ids, pixel_values, image_patch_index)
    scratch = model.llm.init_cache(1, prompt_length)
    valid = (jnp.arange(prompt_length) < length)[None]
    logits, scratch = model.llm(inputs_embeds=embeds, attention_mask=valid.astype(jnp.int32),
                                position_ids=jnp.arange(prompt_length, dtype=jnp.int32)[None], cache=scratch,
                                cache_index=0, logits_at=jnp.reshape(length - 1, (1, 1)))
    first = sample_slots(logits[:, 0], jax.random.fold_in(jax.random.wrap_key_data(key), 0)[None],
                         temperature[None], top_k[None], top_p[None], greedy[None])[0]
    cache = {k: jax.lax.dynamic_update_slice(slots.cache[k], scratch[k].astype(slots.cache[k].dtype),
                                             (0, slot, 0, 0, 0)) for k in slots.cache}
    done = jnp.isin(first, stop_ids) | (budget <= 1)
    put = lambda array, value: array.at[slot].set(value)
    slots = slots.replace(cache=cache, last=put(slots.last, first), length=put(slots.length, length),
                          generated=put(slots.generated, 1), budget=put(slots.budget, budget),
                          active=put(slots.active, ~done), temperature=put(slots.temperature, temperature),
                          top_k=put(slots.top_k, top_k), top_p=put(slots.top_p, top_p),
                          greedy=put(slots.greedy, greedy), key=put(slots.key, key))
    return constrain_slots(slots), first

  def _decode_fn(self, state, slots: Slots, live, stop_ids, *, width: int) -> tuple[Slots, jax.Array, jax.Array]:
    """`decode_steps` steps of the first `width` slots (every busy slot is among them); returns the slots,
    tokens [width, steps] and which of them are real."""
    self.trace_counts["decode"] += 1
    if width == self.num_slots:
      slots, tokens, emitted = self._decode_slots(state, slots, live, stop_ids)
      return constrain_slots(slots), tokens, emitted
    # Fewer busy slots than the cache holds: run only the first `width` (the step cost grows with the slots).
    # The cache arrays [L, S, ...] have the slots on axis 1, every other field on axis 0.
    head = jax.tree.map(lambda x: x[:, :width] if x.ndim == 5 else x[:width], slots)
    head, tokens, emitted = self._decode_slots(state, head, live[:width], stop_ids)
    put_back = lambda whole, part: jax.lax.dynamic_update_slice(whole, part, (0,) * whole.ndim)
    return constrain_slots(jax.tree.map(put_back, slots, head)), tokens, emitted

  def _decode_slots(self, state, slots: Slots, live, stop_ids) -> tuple[Slots, jax.Array, jax.Array]:
    model = nnx.merge(self.graphdef, state)
    set_attention(model, self.decode_attention)
    positions = jnp.arange(self.max_seq_len, dtype=jnp.int32)[None]

    def step(slots: Slots, _):
      visible = (positions <= slots.length[:, None]).astype(jnp.int32)
      logits, cache = model.llm(slots.last[:, None], attention_mask=visible, position_ids=slots.length[:, None],
                                cache=slots.cache, cache_index=slots.length)
      keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(slots.key, slots.generated)
      token = sample_slots(logits[:, -1], keys, slots.temperature, slots.top_k, slots.top_p, slots.greedy)
      emitted = slots.active
      advance = emitted.astype(jnp.int32)
      generated = slots.generated + advance
      done = jnp.isin(token, stop_ids) | (generated >= slots.budget)
      slots = slots.replace(cache=cache, last=jnp.where(emitted, token, slots.last), length=slots.length + advance,
                            generated=generated, active=emitted & ~done)
      return slots, (token, emitted)

    slots = slots.replace(active=slots.active & live)
    slots, (tokens, emitted) = jax.lax.scan(step, slots, None, length=self.decode_steps)
    return slots, tokens.T, emitted.T

  # ---- the host side --------------------------------------------------------------------------------------

  def prompt_buckets(self) -> list[int]:
    """The prompt lengths admission compiles for: powers of two from 128, the last capped at max_seq_len - 1."""
    buckets, n = [], 1
    while True:
      bucket = min(bucket_length(n), self.max_seq_len - 1)
      buckets.append(bucket)
      if bucket >= self.max_seq_len - 1:
        return buckets
      n = bucket + 1

  def decode_widths(self) -> list[int]:
    """The slot counts decode compiles for: powers of two below `slots`, and `slots`."""
    widths = [1 << i for i in range(self.num_slots.bit_length()) if 1 << i < self.num_slots]
    return widths + [self.num_slots]

  def decode_width(self, used: int) -> int:
    """The smallest compiled width covering the first `used` slots (requests take the lowest free slot)."""
    return next(w for w in self.decode_widths() if w >= used)

  def check(self, request: Request) -> None:
    """Raises `InvalidRequestError` for a request that cannot run (before it is queued)."""
    n = len(request.input_ids)
    if n < 1:
      raise InvalidRequestError("the prompt is empty")
    if request.max_new_tokens < 1:
      raise InvalidRequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if n + request.max_new_tokens > self.max_seq_len:
      raise InvalidRequestError(f"the prompt has {n} tokens; with max_new_tokens={request.max_new_tokens} it needs "
                                f"{n + request.max_new_tokens} positions, more than the {self.max_seq_len} of a slot "
                                "(--max-seq-len); shorten the prompt or lower max_tokens")
    if int(np.max(request.input_ids)) >= self.config.llm.vocab_size:
      raise InvalidRequestError(f"the prompt holds id {int(np.max(request.input_ids))}, outside the vocabulary")
    if (np.asarray(request.input_ids) < 0).any() and request.pixel_values is None:
      raise InvalidRequestError("the prompt holds image placeholders but no pixel_values were given")

  def _admit_one(self, slot: int, request: Request) -> int:
    n = len(request.input_ids)
    bucket = min(bucket_length(n), self.max_seq_len - 1)
    ids = np.zeros((1, bucket), np.int32)
    ids[0, :n] = request.input_ids
    image = request.pixel_values is not None and (np.asarray(request.input_ids) < 0).any()
    pixels = np.asarray(request.pixel_values)[None] if image else None
    index = np.asarray(request.image_patch_index, np.int32)[None] if image else None
    params = request.sampling
    key = np.asarray(jax.random.key_data(jax.random.key(request.seed)), np.uint32)
    with self._use_mesh():
      self._slots, first = self._admit(
          self.state, self._slots, jnp.asarray(ids), jnp.int32(n), pixels, index, jnp.int32(slot),
          jnp.int32(request.max_new_tokens), jnp.float32(params.temperature if params.do_sample else 1.0),
          jnp.int32(params.top_k), jnp.float32(params.top_p), jnp.bool_(not params.do_sample), jnp.asarray(key),
          stop_array(self.stop_ids))
    return int(first)

  def _deliver(self, slot: int, new: list[int]) -> None:
    """Hands `new` tokens to the slot's request; frees the slot when the request is done."""
    request = self._requests[slot]
    if request is None:
      return
    finished = None
    for i, token in enumerate(new):
      request.generated += 1
      if token in self.stop_ids:
        finished, new = STOP, new[:i + 1]
        break
      if request.generated >= request.max_new_tokens:
        finished, new = LENGTH, new[:i + 1]
        break
    if finished is not None:
      self._requests[slot] = None
    _notify(request, new, finished)

  def run_once(self) -> bool:
    """One turn of the host loop: cancel, admit, decode. Returns whether there was anything to do."""
    with self._lock:
      for slot, request in enumerate(self._requests):
        if request is not None and request.request_id in self._cancelled:
          self._requests[slot] = None
          _notify(request, [], CANCELLED)
      self._cancelled.clear()
      admitted = []
      for slot in range(self.num_slots):
        if self._requests[slot] is None and self._queue:
          self._requests[slot] = self._queue.popleft()
          admitted.append(slot)
    for slot in admitted:
      self._deliver(slot, [self._admit_one(slot, self._requests[slot])])
    live_slots = [r is not None for r in self._requests]
    if not any(live_slots):
      return bool(admitted)
    width = self.decode_width(max(i for i, live in enumerate(live_slots) if live) + 1)
    with self._use_mesh():
      self._slots, tokens, emitted = self._decode(self.state, self._slots, jnp.asarray(live_slots),
                                                  stop_array(self.stop_ids), width=width)
    tokens, emitted = jax.device_get((tokens, emitted))
    for slot in range(width):
      new = tokens[slot][emitted[slot]].tolist()
      if new:
        self._deliver(slot, new)
    return True

  def submit(self, request: Request) -> None:
    """Queues `request` (checked first); raises `QueueFullError` when `max_queue` requests are waiting."""
    self.check(request)
    with self._lock:
      if len(self._queue) >= self.max_queue:
        raise QueueFullError(f"{len(self._queue)} requests are waiting for a slot; retry later")
      self._queue.append(request)
      self._lock.notify()

  def cancel(self, request_id: str) -> None:
    """Frees the request's slot (or drops it from the queue); its `on_tokens` gets 'cancelled'."""
    with self._lock:
      for request in list(self._queue):
        if request.request_id == request_id:
          self._queue.remove(request)
          _notify(request, [], CANCELLED)
          return
      self._cancelled.add(request_id)
      self._lock.notify()

  @property
  def queue_length(self) -> int:
    return len(self._queue)

  @property
  def busy_slots(self) -> int:
    return sum(r is not None for r in self._requests)

  def warmup(self) -> int:
    """Compiles admission for every prompt bucket, with and without an image, and decode; returns the number of
    compilations. Runs before `start`."""
    before = sum(self.trace_counts.values())
    side, f = self.config.vision.image_size, self.config.adapter.shuffle_factor
    pixels = np.zeros((max_tiles(self.config), side, side, 3), np.uint8)
    index = np.zeros((max_image_tokens(self.config), f * f), np.int32)
    for bucket in self.prompt_buckets():
      for image in (False, True):
        ids = np.ones((bucket,), np.int32)
        if image:
          ids[:2] = self.config.image_token_id
        request = Request("warmup", ids, 1, lambda new, finished: None,
                          pixel_values=pixels if image else None, image_patch_index=index if image else None)
        self._requests[0] = request
        self._deliver(0, [self._admit_one(0, request)])
    for width in self.decode_widths():  # a request in the last slot of each width
      self._requests = [None] * self.num_slots
      self._requests[width - 1] = Request("warmup", np.ones((1,), np.int32), 2, lambda new, finished: None)
      self.run_once()
    self._requests = [None] * self.num_slots
    self._slots = self._slots.replace(active=jnp.zeros((self.num_slots,), bool))
    return sum(self.trace_counts.values()) - before

  def _loop(self) -> None:
    while True:
      with self._lock:
        while self._running and not self._queue and not self._cancelled and self.busy_slots == 0:
          self._lock.wait()
        if not self._running:
          return
      try:
        self.run_once()
      except Exception:  # pylint: disable=broad-except  # a device failure: end every request, keep serving
        logger.exception("engine step failed; ending the requests in its slots")
        self._end_all(ERROR, queued=False)
        self._slots = self._empty_slots()

  def start(self) -> None:
    """Runs the host loop in a daemon thread."""
    self._running = True
    self._thread = threading.Thread(target=self._loop, name="flashvl-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    """Stops after the current turn: queued and running requests are cancelled."""
    with self._lock:
      self._running = False
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout)
    self._end_all(CANCELLED, queued=True)

  def _end_all(self, reason: str, *, queued: bool) -> None:
    with self._lock:
      ended = [r for r in self._requests if r is not None] + (list(self._queue) if queued else [])
      self._requests = [None] * self.num_slots
      if queued:
        self._queue.clear()
    for request in ended:
      _notify(request, [], reason)

  def complete(self, requests: list[Request], state: Any) -> list[list[int]]:
    """Runs `requests` to their end in the calling thread with the parameters `state` (a state of the module's
    structure, e.g. a training step's current policy) instead of the engine's own, and returns each one's tokens,
    up to and including a stop id. Requests beyond the free slots wait and are admitted as others finish. The
    host loop must not be running; afterwards the engine holds its own parameters again."""
    if self._running:
      raise RuntimeError("Engine.complete runs the requests itself; stop the host loop first")
    open_requests = set(range(len(requests)))
    results = _collect(requests, open_requests.discard)
    for request in requests:
      self.check(request)
    waiting = collections.deque(requests)
    own_state, self.state = self.state, state
    try:
      while open_requests:
        with self._lock:
          while waiting and len(self._queue) < self.max_queue:
            self._queue.append(waiting.popleft())
        self.run_once()
    except BaseException:  # leave no half-run request behind for the next call
      self._end_all(ERROR, queued=True)
      self._slots = self._empty_slots()
      raise
    finally:
      self.state = own_state
    return results

  def generate(self, requests: list[Request], timeout: float | None = None) -> list[list[int]]:
    """Blocking helper (the loop must be running): submits `requests` (their `on_tokens` is replaced) and returns
    each one's tokens, up to and including a stop id."""
    finished: queue.Queue[int] = queue.Queue()
    results = _collect(requests, finished.put)
    for request in requests:
      self.submit(request)
    for _ in requests:
      finished.get(timeout=timeout)
    return results


def _collect(requests: list[Request], on_finished: Callable[[int], None]) -> list[list[int]]:
  """Sets each request's `on_tokens` to gather its tokens into the returned lists; `on_finished(i)` is called when
  request i ends."""
  results: list[list[int]] = [[] for _ in requests]
  for i, request in enumerate(requests):
    def collect(new, reason, i=i):
      results[i].extend(new)
      if reason is not None:
        on_finished(i)
    request.on_tokens = collect
  return results


def _notify(request: Request, new: list[int], finished: str | None) -> None:
  try:
    request.on_tokens(new, finished)
  except Exception:  # pylint: disable=broad-except  # a consumer's bug must not stop the other requests
    logger.exception("on_tokens of request %s failed", request.request_id)
