"""Random-access data sources (`len` and `[index]`, as `grain.MapDataset.source` takes): JSON/JSONL,
ArrayRecord, TFDS, parquet.

Every source yields records in one of two shapes (extra keys are kept and ignored downstream):

- conversation (SFT): `{"id": str, "image": str | bytes | PIL.Image | None, "messages": [{"role", "content"}]}`
- preference (DPO): `{"id", "image", "prompt": messages, "chosen": str, "rejected": str}`

`image` stays undecoded (a path resolved against the image root, or raw bytes) so that decoding, and its
failures, happen in the pipeline where the bad-sample policy applies. A record that cannot be read or
parsed raises `BadSampleError` naming the sample; the pipeline skips or fails on it.

Input formats accepted by `parse_record`: LLaVA conversations (`{"from": "human" | "gpt" | "system",
"value": ...}`; an `<image>` marker in the text is kept and placed by `preprocess.prompt`), role/content
messages, and preference records whose `prompt` is a conversation or a plain string. Records stored under other
field names (a question/answer pair, a `dialog` column) are read through a `fields.Fields` mapping.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from PIL import Image

from flashvl_jax.data.fields import Fields
from flashvl_jax.config import ConfigError
from flashvl_jax.errors import MissingPathError, UserError
from flashvl_jax.preprocess.prompt import normalize_messages

PathLike = str | os.PathLike


class DataError(UserError, ValueError):
  """A data file or source that cannot be used at all (unreadable, no records, the wrong kind of records)."""


class BadSampleError(UserError, ValueError):
  """A sample that cannot be used (unreadable, malformed, no target); names the sample and the reason."""

  def __init__(self, sample_id: str, reason: str):
    super().__init__(f"bad sample {sample_id!r}: {reason}")
    self.sample_id = sample_id
    self.reason = reason


def to_messages(turns: Any, sample_id: str) -> list[dict[str, str]]:
  """LLaVA `{"from", "value"}` turns or `{"role", "content"}` messages -> role/content messages."""
  if not isinstance(turns, list) or not turns or not all(isinstance(t, Mapping) for t in turns):
    raise BadSampleError(sample_id, f"expected a non-empty list of conversation turns, got {turns!r:.80}")
  try:
    return [{"role": role, "content": content} for role, content in normalize_messages(turns)]
  except ValueError as e:
    raise BadSampleError(sample_id, str(e)) from None


def _completion_text(value: Any, key: str, sample_id: str) -> str:
  """A preference completion given as a string or as messages ending in an assistant turn."""
  if value is None:
    raise BadSampleError(sample_id, f"the preference record has no '{key}'")
  if isinstance(value, str):
    return value
  messages = to_messages(value, sample_id)
  if messages[-1]["role"] != "assistant":
    raise BadSampleError(sample_id, f"'{key}' must be a string or end with an assistant turn")
  return messages[-1]["content"]


def _resolve_image(image: Any, image_root: pathlib.Path | None, sample_id: str) -> Any:
  if image is None or isinstance(image, (bytes, Image.Image)):
    return image
  if isinstance(image, list):  # LLaVA multi-image field
    if len(image) != 1:
      raise BadSampleError(sample_id, f"{len(image)} images given; Flash-VL takes at most one image per sample")
    image = image[0]
  if not isinstance(image, str):
    raise BadSampleError(sample_id, f"'image' must be a path, bytes or null, got {type(image).__name__}")
  path = pathlib.Path(image)
  return str(path if path.is_absolute() or image_root is None else image_root / path)


def parse_record(raw: Any, *, default_id: str, image_root: PathLike | None = None,
                 fields: Fields | None = None) -> dict[str, Any]:
  """Normalises one raw record (see the module docstring) to the conversation or preference shape; `fields`
  names the stored fields when they are not the default ones."""
  if not isinstance(raw, Mapping):
    raise BadSampleError(default_id, f"a record must be a JSON object, got {type(raw).__name__}")
  if fields is not None:
    raw = {**raw, **fields.to_record(raw)}
  sample_id = str(raw.get("id", default_id))
  root = pathlib.Path(image_root) if image_root is not None else None
  record = dict(raw, id=sample_id, image=_resolve_image(raw.get("image"), root, sample_id))
  if "chosen" in raw or "rejected" in raw:
    prompt = raw.get("prompt")
    if prompt is None:
      raise BadSampleError(sample_id, "the preference record has no 'prompt'")
    record["prompt"] = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                        else to_messages(prompt, sample_id))
    for key in ("chosen", "rejected"):
      record[key] = _completion_text(raw.get(key), key, sample_id)
    return record
  turns = raw.get("conversations", raw.get("messages"))
  record.pop("conversations", None)
  record["messages"] = to_messages(turns, sample_id)
  return record


def data_files(path: PathLike, pattern: str) -> list[pathlib.Path]:
  """The files `path` names: one file, a directory's files matching `pattern` (recursively, sorted) or a glob."""
  text = os.fspath(path)
  if any(c in text for c in "*?["):
    files = sorted(pathlib.Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
  elif os.path.isdir(text):
    files = sorted(pathlib.Path(text).rglob(pattern))
  else:
    files = [pathlib.Path(text)] if os.path.isfile(text) else []
  if not files:
    raise MissingPathError(f"no data files at {text!r} (give a file, a directory holding {pattern} files or a "
                           "glob pattern)")
  return files


def _line_offsets(path: pathlib.Path) -> np.ndarray:
  """Byte offsets of the non-blank lines of a file: [n, 2] (line start, line number)."""
  offsets, pos = [], 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        offsets.append((pos, lineno))
      pos += len(line)
  return np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


class RecordSource:
  """A random-access source of stored records: subclasses give `__len__` and `raw_record(index)` (the record as
  stored, and the id it gets when it has none); `source[index]` parses it (`parse_record`)."""

  image_root: pathlib.Path | None = None
  fields: Fields | None = None  # None: the default field names, extra keys kept as they are

  def raw_record(self, index: int) -> tuple[Any, str]:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw, default_id = self.raw_record(index)
    return parse_record(raw, default_id=default_id, image_root=self.image_root, fields=self.fields)

  def check_fields(self, what: str) -> None:
    """Raises ConfigError if the first record lacks a field the mapping names, so that a wrong mapping stops the
    run at start instead of skipping every sample. `what` names the source in the message."""
    if not len(self):
      raise DataError(f"{what} holds no records")
    try:
      raw, _ = self.raw_record(0)
    except BadSampleError:
      return  # a bad first record is the bad-sample policy's business
    if not isinstance(raw, Mapping):
      return
    missing = (self.fields or Fields()).missing(raw)
    if missing:
      raise ConfigError(f"{what}: the records have no field for {', '.join(missing)}; their fields are "
                        f"{', '.join(map(repr, raw))} (set data.fields.* to name them)")


class JsonSource(RecordSource):
  """Conversation or preference records from a `.json` list or a `.jsonl` file (one record per line).

  JSONL is indexed lazily: one pass records the byte offset of each line, and `source[i]` reads and
  parses only line i, so a malformed line is a bad sample, not a failed load. Relative image paths are
  resolved against `image_root` (default: the data file's folder).
  """

  def __init__(self, path: PathLike, image_root: PathLike | None = None, fields: Fields | None = None):
    self.path = pathlib.Path(path)
    self.fields = fields
    if not self.path.is_file():
      raise MissingPathError(f"data file {str(self.path)!r} does not exist")
    self.image_root = pathlib.Path(image_root) if image_root is not None else self.path.parent
    self._records: list[Any] | None = None
    self._offsets: np.ndarray | None = None
    if self.path.suffix == ".json":
      try:
        records = json.loads(self.path.read_text())
      except json.JSONDecodeError as e:
        raise DataError(f"{self.path} is not valid JSON ({e}); use .jsonl for one record per line") from None
      if not isinstance(records, list):
        raise DataError(f"{self.path} must hold a JSON list of records, got {type(records).__name__}")
      self._records = records
    elif self.path.suffix == ".jsonl":
      self._offsets = _line_offsets(self.path)
    else:
      raise DataError(f"unsupported data file {str(self.path)!r}: expected a .json or .jsonl file")

  def __len__(self) -> int:
    return len(self._records) if self._records is not None else len(self._offsets)

  def raw_record(self, index: int) -> tuple[Any, str]:
    if self._records is not None:
      return self._records[index], f"{self.path.name}[{index}]"
    start, lineno = self._offsets[index]
    default_id = f"{self.path.name}:{lineno}"
    with open(self.path, "rb") as f:
      f.seek(int(start))
      line = f.readline()
    try:
      return json.loads(line), default_id
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadSampleError(default_id, f"malformed JSON line ({e})") from None

  def __repr__(self) -> str:
    return f"JsonSource({str(self.path)!r}, {len(self)} records)"


def _encode_image(image: Any) -> Any:
  if isinstance(image, Image.Image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
  return image


def write_array_record(records: Iterable[Mapping[str, Any]], path: PathLike) -> int:
  """Writes records as msgpack maps to one ArrayRecord file; PIL images are stored inline as PNG bytes.

  Images given as paths stay paths (resolved against `ArrayRecordSource(image_root=...)`). Returns the
  number of records written.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  count = 0
  try:
    for record in records:
      writer.write(msgpack.packb({**record, "image": _encode_image(record.get("image"))}, use_bin_type=True))
      count += 1
  finally:
    writer.close()
  return count


class ArrayRecordSource(RecordSource):
  """Records stored by `write_array_record` (msgpack maps, image bytes inline) in ArrayRecord files."""

  def __init__(self, paths: PathLike | Sequence[PathLike], image_root: PathLike | None = None,
               fields: Fields | None = None):
    import grain

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
    if missing:
      raise MissingPathError(f"ArrayRecord files not found: {missing}")
    self.image_root = pathlib.Path(image_root) if image_root is not None else None
    self.fields = fields
    self._source = grain.sources.ArrayRecordDataSource([os.fspath(p) for p in paths])

  def __len__(self) -> int:
    return len(self._source)

  def raw_record(self, index: int) -> tuple[Any, str]:
    default_id = f"record[{index}]"
    try:
      return msgpack.unpackb(self._source[index], raw=False), default_id
    except ValueError as e:  # every msgpack decoding error is a ValueError
      raise BadSampleError(default_id, f"record is not valid msgpack ({e})") from None

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self)} records)"
