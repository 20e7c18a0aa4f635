"""Chat completions on top of the continuous-batching engine: request -> prompt -> tokens -> text.

`ChatService.prepare` turns an OpenAI request into the engine's `Request` (image decoding, tiling and
tokenization, on the host), and `ChatService.run` yields text deltas as the engine produces tokens, cutting at
`stop` strings (which cancels the rest of the generation) and ending with the finish reason. Metrics go to a
Prometheus registry of the service's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import pathlib
import time
from typing import AsyncIterator

import prometheus_client as prom

from flashvl_jax.api import FlashVL
from flashvl_jax.engine import CANCELLED, ERROR, Engine, Request
from flashvl_jax.preprocess.image import load_image
from flashvl_jax.sampling import SamplingParams
from flashvl_jax.serve.protocol import ChatCompletionRequest, to_conversation

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceUnavailableError(RuntimeError):
  """The request was ended by a shutdown or an engine failure (HTTP 503 / 500)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


class Metrics:
  """The server's Prometheus metrics (in `registry`, not the process-wide default)."""

  def __init__(self, engine: Engine):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("flashvl_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
    self.prompt_tokens = prom.Counter("flashvl_prompt_tokens", "Prompt tokens (image tokens included)", registry=r)
    self.completion_tokens = prom.Counter("flashvl_completion_tokens", "Generated tokens", registry=r)
    prom.Gauge("flashvl_queue_length", "Requests waiting for a decode slot",
               registry=r).set_function(lambda: engine.queue_length)
    prom.Gauge("flashvl_busy_slots", "Decode slots serving a request", registry=r).set_function(
        lambda: engine.busy_slots)
    prom.Gauge("flashvl_batch_occupancy", "Busy decode slots / all decode slots", registry=r).set_function(
        lambda: engine.busy_slots / engine.num_slots)
    prom.Gauge("flashvl_compilations", "Engine functions compiled since start (warm-up included)",
               registry=r).set_function(lambda: sum(engine.trace_counts.values()))
    self.ttft = prom.Histogram("flashvl_time_to_first_token_seconds", "From arrival to the first token",
                               buckets=LATENCY_BUCKETS, registry=r)
    self.tpot = prom.Histogram("flashvl_time_per_output_token_seconds", "Mean time between a request's tokens",
                               buckets=LATENCY_BUCKETS, registry=r)

  def render(self) -> bytes:
    return prom.generate_latest(self.registry)


@dataclasses.dataclass
class Prepared:
  """A request turned into engine input, plus what the response needs."""

  request: Request
  stops: list[str]
  prompt_tokens: int


@dataclasses.dataclass
class Delta:
  """A piece of the answer; the last one has `finish_reason` ('stop' or 'length') and the token counts."""

  text: str
  finish_reason: str | None = None
  completion_tokens: int = 0


class StopMatcher:
  """Cuts streamed text at the first stop string, holding back a tail that could be the start of one."""

  def __init__(self, stops: list[str]):
    self.stops, self.buffer = stops, ""

  def push(self, text: str) -> tuple[str, bool]:
    """(text safe to emit, whether a stop string was found)."""
    self.buffer += text
    hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
    if hits:
      out, self.buffer = self.buffer[:min(hits)], ""
      return out, True
    hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
    out, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
    return out, False

  def flush(self) -> str:
    out, self.buffer = self.buffer, ""
    return out


class ChatService:
  """One model, one engine, and the translation between OpenAI requests and them."""

  def __init__(self, model: FlashVL, engine: Engine, *, model_name: str,
               allowed_image_dir: str | pathlib.Path | None = None):
    self.model, self.engine, self.model_name = model, engine, model_name
    self.allowed_image_dir = None if allowed_image_dir is None else pathlib.Path(allowed_image_dir)
    self.metrics = Metrics(engine)
    self.ready = False
    self._ids = itertools.count()

  def prepare(self, body: ChatCompletionRequest) -> Prepared:
    """Validates and encodes a request (host work: image decoding, tiling, tokenization)."""
    messages, image_source = to_conversation(body, self.allowed_image_dir)
    image = None if image_source is None else load_image(image_source)
    processor = self.model.processor
    example = processor.encode_example(image, messages, add_generation_prompt=True, max_tiles=body.max_tiles)
    prompt = example["input_ids"][example["attention_mask"].astype(bool)]
    room = self.engine.max_seq_len - len(prompt)
    limit = body.token_limit if body.token_limit is not None else room
    greedy = body.temperature == 0
    sampling = SamplingParams(not greedy, 1.0 if greedy else body.temperature, body.top_k, body.top_p)
    request = Request(f"chatcmpl-{next(self._ids)}", prompt, limit, on_tokens=None,
                      pixel_values=example["pixel_values"] if image is not None else None,
                      image_patch_index=example["image_patch_index"] if image is not None else None,
                      sampling=sampling, seed=body.seed if body.seed is not None else int(time.time_ns() % 2**31))
    self.engine.check(request)
    return Prepared(request, body.stop, len(prompt))

  def run(self, prepared: Prepared) -> AsyncIterator[Delta]:
    """Submits the request now (`engine.QueueFullError` when the queue is full) and returns its text deltas as an
    async iterator; call it from the event loop."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[list[int], str | None]] = asyncio.Queue()
    prepared.request.on_tokens = lambda new, reason: loop.call_soon_threadsafe(updates.put_nowait, (new, reason))
    self.engine.submit(prepared.request)
    return self._deltas(prepared, updates)

  async def _deltas(self, prepared: Prepared, updates: asyncio.Queue) -> AsyncIterator[Delta]:
    """The text as it is generated; cancels the request if the consumer stops early."""
    request = prepared.request
    stop_ids = self.engine.stop_ids
    decoder = self.model.tokenizer.stream_decoder()
    matcher = StopMatcher(prepared.stops)
    start, first_at, count, finished = request.submitted_at, None, 0, False
    try:
      while True:
        new, reason = await updates.get()
        if new and first_at is None:
          first_at = time.perf_counter()
          self.metrics.ttft.observe(first_at - start)
        count += len(new)
        if reason in (CANCELLED, ERROR):
          finished = True
          raise ServiceUnavailableError("the server is shutting down" if reason == CANCELLED else
                                        "generation failed (see the server log)", 503 if reason == CANCELLED else 500)
        text, stopped = matcher.push(decoder.push([i for i in new if i not in stop_ids]))
        if stopped:
          self.engine.cancel(request.request_id)
          reason = "stop"
        elif reason is not None:
          text += matcher.push(decoder.flush())[0] + matcher.flush()
        if reason is not None:
          finished = True
          self.metrics.completion_tokens.inc(count)
          self.metrics.prompt_tokens.inc(prepared.prompt_tokens)
          if count > 1:
            self.metrics.tpot.observe((time.perf_counter() - first_at) / (count - 1))
          yield Delta(text, reason, count)
          return
        if text:
          yield Delta(text)
    finally:
      if not finished:  # the client went away (or the task was cancelled): free the slot now
        self.engine.cancel(request.request_id)


def usage(prepared: Prepared, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prepared.prompt_tokens + completion_tokens}
