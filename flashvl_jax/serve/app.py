"""The HTTP layer: an OpenAI-compatible FastAPI app over a `ChatService`.

  POST /v1/chat/completions   plain JSON, or Server-Sent Events chunks ending in `data: [DONE]` (`stream`)
  GET  /v1/models             the one model served
  GET  /health                200 {"status": "ready"} once warmed up, else 503
  GET  /metrics               Prometheus text (see `service.Metrics`)

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 for a request that cannot be
served as given (malformed JSON, a field of the wrong type, an undecodable image, a prompt over the context,
`max_tokens` over the limit), 429 with Retry-After when the queue is full, 503 while starting or shutting down.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from flashvl_jax.engine import QueueFullError
from flashvl_jax.errors import UserError
from flashvl_jax.serve.protocol import ChatCompletionRequest
from flashvl_jax.serve.service import ChatService, Delta, Prepared, ServiceUnavailableError, usage

CHAT_PATH = "/v1/chat/completions"


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
  body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
  return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
  problems, param = [], None
  for item in error.errors():
    if item.get("type") == "json_invalid":
      return f"the request body is not valid JSON ({item.get('ctx', {}).get('error', item['msg'])})", None
    loc = ".".join(str(x) for x in item["loc"] if x != "body")
    param = param or loc
    problems.append(f"{loc or 'body'}: {item['msg']}")
  return "; ".join(problems[:5]), param


def create_app(service: ChatService, lifespan: Any = None) -> FastAPI:
  """The app; `lifespan` (an async context manager factory, as FastAPI takes) starts and stops the engine."""
  app = FastAPI(title="Flash-VL (flashvl_jax)", docs_url=None, redoc_url=None, lifespan=lifespan)

  @app.middleware("http")
  async def count_requests(request: HTTPRequest, call_next):
    response = await call_next(request)
    if request.url.path == CHAT_PATH:
      service.metrics.requests.labels(str(response.status_code)).inc()
    return response

  @app.exception_handler(RequestValidationError)
  async def invalid_request(_, error: RequestValidationError):
    message, param = _validation_message(error)
    return error_response(400, message, param=param)

  @app.exception_handler(QueueFullError)
  async def queue_full(_, error: QueueFullError):
    return error_response(429, str(error), "rate_limit_error", headers={"Retry-After": "1"})

  @app.exception_handler(UserError)
  async def bad_request(_, error: UserError):
    return error_response(400, str(error))

  @app.exception_handler(ServiceUnavailableError)
  async def unavailable(_, error: ServiceUnavailableError):
    return error_response(error.status, str(error), "server_error")

  @app.get("/health")
  async def health():
    return JSONResponse({"status": "ready" if service.ready else "unavailable"}, status_code=200 if service.ready else 503)

  @app.get("/metrics")
  async def metrics():
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                        "owned_by": "flashvl_jax"}]}

  @app.post(CHAT_PATH)
  async def chat_completions(body: ChatCompletionRequest):
    if not service.ready:
      raise ServiceUnavailableError("the server is not ready (warming up or shutting down)", 503)
    prepared = await run_in_threadpool(service.prepare, body)
    deltas = service.run(prepared)
    created = int(time.time())
    if body.stream:
      include_usage = bool(body.stream_options and body.stream_options.include_usage)
      return StreamingResponse(_sse(service, prepared, deltas, created, include_usage), media_type="text/event-stream")
    pieces, last = [], Delta("")
    async for delta in deltas:
      pieces.append(delta.text)
      last = delta
    message = {"role": "assistant", "content": "".join(pieces)}
    return {"id": prepared.request.request_id, "object": "chat.completion", "created": created,
            "model": service.model_name, "choices": [{"index": 0, "message": message,
                                                      "finish_reason": last.finish_reason}],
            "usage": usage(prepared, last.completion_tokens)}

  return app


async def _sse(service: ChatService, prepared: Prepared, deltas: AsyncIterator[Delta], created: int,
               include_usage: bool) -> AsyncIterator[str]:
  base = {"id": prepared.request.request_id, "object": "chat.completion.chunk", "created": created,
          "model": service.model_name}

  def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"

  def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
    return event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

  yield chunk({"role": "assistant", "content": ""})
  try:
    async for delta in deltas:
      if delta.text:
        yield chunk({"content": delta.text})
      if delta.finish_reason is not None:
        yield chunk({}, delta.finish_reason)
        if include_usage:
          yield event({**base, "choices": [], "usage": usage(prepared, delta.completion_tokens)})
  except ServiceUnavailableError as e:  # headers are sent: report it in the stream
    yield event({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
  yield "data: [DONE]\n\n"
