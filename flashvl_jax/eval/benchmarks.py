"""Benchmark files as `Item`s: VLMEvalKit-style TSV (base64 images, lettered option columns) and JSONL (image paths).

TSV columns: `index`, `image` (base64; a short value is the `index` of the row holding the image, as VLMEvalKit
stores repeated images) or `image_path`, `question`, optional `hint`, option columns `A`, `B`, ..., `answer` (a
letter, a string, or a Python/JSON list of accepted strings), optional `category`. JSONL records: `{"id",
"image": path relative to the file (or absent), "question", "options": {"A": ...} or [...], "answer": str or
[str, ...], "hint", "category", "task"}`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import json
import pathlib
import string
import sys
from typing import Any, Literal

from flashvl_jax.data.sources import DataError

Format = Literal["tsv", "jsonl"]
LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  question: str
  answers: tuple[str, ...]  # accepted answers (multiple choice: the letter)
  image: bytes | str | None = None  # encoded bytes or a path
  options: tuple[tuple[str, str], ...] = ()  # (letter, text)
  hint: str | None = None
  category: str | None = None
  task: str | None = None  # a JSONL record's own task type


def detect_format(path: pathlib.Path) -> Format:
  suffix = path.suffix.lower()
  if suffix in (".tsv", ".jsonl"):
    return suffix[1:]
  raise DataError(f"{path}: cannot tell the format from the suffix {suffix!r}; pass --format tsv or jsonl")


def read_items(path: str | pathlib.Path, fmt: Format | None = None) -> list[Item]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"benchmark file {str(path)!r} does not exist")
  items = (_read_tsv if (fmt or detect_format(path)) == "tsv" else _read_jsonl)(path)
  if not items:
    raise DataError(f"{path} holds no items")
  ids = [item.id for item in items]
  if len(set(ids)) != len(ids):
    raise DataError(f"{path}: item ids repeat (e.g. {next(i for i in ids if ids.count(i) > 1)!r}); each needs its own")
  return items


def _answers(value: Any) -> tuple[str, ...]:
  if isinstance(value, str) and value.strip().startswith("["):
    try:
      value = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      pass
  values = value if isinstance(value, (list, tuple)) else [value]
  return tuple(str(v).strip() for v in values if v is not None and str(v).strip())


def _present(value: Any) -> bool:
  return value is not None and str(value).strip() not in ("", "nan", "NaN", "None")


def _read_tsv(path: pathlib.Path) -> list[Item]:
  csv.field_size_limit(sys.maxsize)  # base64 images are long fields
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  if not rows or "question" not in rows[0]:
    raise DataError(f"{path}: a benchmark TSV needs a header with at least 'question' (found "
                    f"{list(rows[0]) if rows else 'no rows'})")
  images = {row.get("index"): row.get("image") for row in rows}
  items = []
  for number, row in enumerate(rows, start=2):
    item_id = row.get("index") or str(number - 2)
    image: bytes | str | None = None
    if _present(row.get("image")):
      encoded = row["image"]
      if len(encoded) <= 64 and encoded in images and images[encoded] != encoded:  # a reference to another row
        encoded = images[encoded]
      try:
        image = base64.b64decode("".join(encoded.split()), validate=True)
      except (binascii.Error, ValueError):
        raise DataError(f"{path} line {number}: the image column is not base64") from None
    elif _present(row.get("image_path")):
      image = str(path.parent / row["image_path"])
    options = tuple((k, row[k].strip()) for k in LETTERS if k in row and _present(row[k]))
    if not _present(row.get("answer")):
      raise DataError(f"{path} line {number} (index {item_id}): no answer to score against")
    items.append(Item(item_id, row["question"], _answers(row["answer"]), image, options,
                      row["hint"] if _present(row.get("hint")) else None, row.get("category") or None))
  return items


def _read_jsonl(path: pathlib.Path) -> list[Item]:
  items = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} line {number}: not JSON ({e})") from None
    if not isinstance(record, dict) or "question" not in record or not _present(record.get("answer")):
      raise DataError(f"{path} line {number}: a record needs 'question' and 'answer'")
    options = record.get("options") or {}
    if isinstance(options, list):
      options = dict(zip(LETTERS, options))
    image = record.get("image")
    items.append(Item(str(record.get("id", number)), record["question"], _answers(record["answer"]),
                      str(path.parent / image) if image else None,
                      tuple((k, str(v)) for k, v in options.items()), record.get("hint"), record.get("category"),
                      record.get("task")))
  return items
