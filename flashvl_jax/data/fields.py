"""Which field of a stored record holds what: the mapping from a dataset's own column names to the record shape
`sources.parse_record` takes (`data.fields` in the training config).

A conversation comes from one field of turns (`messages`; by default `conversations` or `messages`) or from a
question/answer pair of text fields, which becomes one user turn and one assistant turn. Values are normalised on
the way: TFDS text arrives as bytes (decoded as UTF-8) and images as uint8 arrays (made PIL images), Hugging Face
`datasets` stores an image as `{"bytes": ..., "path": ...}` (the bytes, else the path, are taken), and
JSON-encoded turn lists are parsed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np
from PIL import Image

from flashvl_jax.config import ConfigError

DEFAULT_TURN_FIELDS = ("conversations", "messages")


@dataclasses.dataclass(frozen=True)
class Fields:
  """Field names of the stored records; an empty name means the default one."""

  id: str = "id"
  image: str = "image"
  messages: str = ""  # the turns (LLaVA or role/content); default: 'conversations' or 'messages'
  question: str = ""  # instead of `messages`: a user question ...
  answer: str = ""  # ... and the assistant's answer
  prompt: str = "prompt"  # preference records (DPO)
  chosen: str = "chosen"
  rejected: str = "rejected"

  def __post_init__(self):
    if bool(self.question) != bool(self.answer):
      raise ConfigError("data.fields.question and data.fields.answer go together: set both or neither")
    if self.question and self.messages:
      raise ConfigError("set data.fields.messages or data.fields.question/answer, not both")

  def missing(self, raw: Mapping[str, Any]) -> list[str]:
    """`data.fields.KEY ('name')` for each configured field a record lacks (the check made at start)."""
    wanted = {"question": self.question, "answer": self.answer, "messages": self.messages}
    if "chosen" in raw or self.chosen in raw:  # a preference record
      wanted = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
    elif not self.question and not self.messages and not any(f in raw for f in DEFAULT_TURN_FIELDS):
      return [f"data.fields.messages (none of {', '.join(DEFAULT_TURN_FIELDS)})"]
    return [f"data.fields.{key} ({name!r})" for key, name in wanted.items() if name and name not in raw]

  def to_record(self, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The values `parse_record` reads, under its names (turns as "conversations"); fields absent stay absent."""
    value = lambda name: _text(raw[name]) if name in raw else None
    record = {}
    if self.id in raw:
      record["id"] = value(self.id)
    if self.image in raw:
      record["image"] = _image(raw[self.image])
    if self.question:
      if self.question in raw and self.answer in raw:
        record["conversations"] = [{"role": "user", "content": value(self.question)},
                                   {"role": "assistant", "content": value(self.answer)}]
    else:
      for name in (self.messages,) if self.messages else DEFAULT_TURN_FIELDS:
        if name in raw:
          record["conversations"] = _turns(raw[name])
          break
    for key in ("prompt", "chosen", "rejected"):
      name = getattr(self, key)
      if name in raw:
        record[key] = _turns(raw[name])
    return record


def _text(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
    return _text(value.item())
  return value


def _turns(value: Any) -> Any:
  """Turns as stored: a list (of dicts), JSON text of one, or plain text (a preference prompt or completion)."""
  value = _text(value)
  if isinstance(value, str) and value.lstrip().startswith("["):
    try:
      turns = json.loads(value)
    except json.JSONDecodeError:
      return value
    # only a list of turns is taken as turns: a prompt such as "[1, 2] sums to?" stays text
    return turns if turns and all(isinstance(t, Mapping) for t in turns) else value
  if hasattr(value, "tolist"):  # a numpy array of dicts (pyarrow list columns)
    value = value.tolist()
  if isinstance(value, list):
    return [{k: _text(v) for k, v in turn.items()} if isinstance(turn, Mapping) else turn for turn in value]
  return value


def _image(value: Any) -> Any:
  if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # Hugging Face datasets' Image
    return value.get("bytes") or value.get("path")
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:  # a decoded TFDS Image
    return Image.fromarray(value[..., 0] if value.shape[-1] == 1 else value)
  return value
