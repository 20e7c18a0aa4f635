"""The OpenAI Chat Completions request, as pydantic models, and its translation to a Flash-VL conversation.

Accepted: `messages` with string content or lists of `text` and `image_url` parts (one image per request, as a
base64 `data:` URL or, under `--allowed-image-dir`, a local path or `file://` URL), `max_tokens` /
`max_completion_tokens`, `temperature` (0 = greedy), `top_p`, `top_k` (an extension), `seed`, `stop`,
`stream` (+ `stream_options.include_usage`), `n=1`, and the extension `max_tiles`. Fields of other OpenAI
features are ignored; a known field of the wrong type or out of range is a 400 naming it.
"""

from __future__ import annotations

import base64
import binascii
import pathlib
from typing import Literal, Union

import pydantic
from pydantic import BaseModel, Field

from flashvl_jax.errors import UserError
from flashvl_jax.preprocess.prompt import IMAGE_PLACEHOLDER


class BadRequestError(UserError, ValueError):
  """A request the server cannot serve as given (HTTP 400); the message names the field."""


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class ImageURL(BaseModel):
  url: str
  detail: str | None = None


class ImagePart(BaseModel):
  type: Literal["image_url"]
  image_url: ImageURL


Part = Union[TextPart, ImagePart]


class Message(BaseModel):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[Part]
  name: str | None = None


class StreamOptions(BaseModel):
  include_usage: bool = False


class ChatCompletionRequest(BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")

  model: str | None = None
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(default=None, ge=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)
  temperature: float = Field(default=1.0, ge=0, le=2)
  top_p: float = Field(default=1.0, gt=0, le=1)
  top_k: int = Field(default=0, ge=0)
  seed: int | None = None
  stop: str | list[str] | None = Field(default=None, validate_default=True)  # a list after validation
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(default=1, ge=1, le=1)
  max_tiles: int | None = Field(default=None, ge=1)

  @pydantic.field_validator("stop")
  @classmethod
  def _stop_strings(cls, value):
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4 or any(not s for s in stops):
      raise ValueError("stop takes up to 4 non-empty strings")
    return stops

  @property
  def token_limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def decode_image_url(url: str, allowed_dir: pathlib.Path | None) -> bytes | pathlib.Path:
  """The bytes of a base64 `data:` URL, or a local file under `allowed_dir`; anything else is refused."""
  if url.startswith("data:"):
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
      raise BadRequestError("image_url: a data: URL must be base64 (data:image/png;base64,...)")
    try:
      return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
      raise BadRequestError("image_url: the data: URL is not valid base64") from None
  if url.startswith(("http://", "https://", "ftp://")):
    raise BadRequestError("image_url: this server fetches nothing from the network; send the image as a base64 "
                          "data: URL")
  if allowed_dir is None:
    raise BadRequestError("image_url: local files are not served (start the server with --allowed-image-dir); send "
                          "the image as a base64 data: URL")
  path = pathlib.Path(url.removeprefix("file://")).resolve()
  if not path.is_relative_to(allowed_dir.resolve()):
    raise BadRequestError(f"image_url: {url!r} is outside the allowed image directory")
  if not path.is_file():
    raise BadRequestError(f"image_url: {url!r} does not exist")
  return path


def to_conversation(request: ChatCompletionRequest,
                    allowed_dir: pathlib.Path | None) -> tuple[list[dict[str, str]], bytes | pathlib.Path | None]:
  """(role/content messages, the image or None): text parts joined by newlines, the image's place marked with
  the `<image>` placeholder in its message."""
  messages, image = [], None
  for i, message in enumerate(request.messages):
    role = "system" if message.role == "developer" else message.role
    if isinstance(message.content, str):
      messages.append({"role": role, "content": message.content})
      continue
    pieces = []
    for part in message.content:
      if isinstance(part, TextPart):
        pieces.append(part.text)
        continue
      if role != "user":
        raise BadRequestError(f"messages[{i}]: images go in user messages")
      if image is not None:
        raise BadRequestError("Flash-VL takes one image per request; this one has more")
      image = decode_image_url(part.image_url.url, allowed_dir)
      pieces.append(IMAGE_PLACEHOLDER)
    messages.append({"role": role, "content": "\n".join(pieces)})
  return messages, image
