"""Random-access data sources (`len` and `[index]`, as `grain.MapDataset.source` takes): JSON/JSONL,
ArrayRecord, TFDS.

Every source yields records in one of two shapes (extra keys are kept and ignored downstream):

- conversation (SFT): `{"id": str, "image": str | bytes | PIL.Image | None, "messages": [{"role", "content"}]}`
- preference (DPO): `{"id", "image", "prompt": messages, "chosen": str, "rejected": str}`

`image` stays undecoded (a path resolved against the image root, or raw bytes) so that decoding, and its
failures, happen in the pipeline where the bad-sample policy applies. A record that cannot be read or
parsed raises `BadSampleError` naming the sample; the pipeline skips or fails on it.

Input formats accepted by `parse_record`: LLaVA conversations (`{"from": "human" | "gpt" | "system",
"value": ...}`; an `<image>` marker in the text is kept and placed by `preprocess.prompt`), role/content
messages, and preference records whose `prompt` is a conversation or a plain string.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from PIL import Image

from flashvl_jax.errors import MissingDependencyError, MissingPathError, UserError
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


def parse_record(raw: Any, *, default_id: str, image_root: PathLike | None = None) -> dict[str, Any]:
  """Normalises one raw record (see the module docstring) to the conversation or preference shape."""
  if not isinstance(raw, Mapping):
    raise BadSampleError(default_id, f"a record must be a JSON object, got {type(raw).__name__}")
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


def _line_offsets(path: pathlib.Path) -> np.ndarray:
  """Byte offsets of the non-blank lines of a file: [n, 2] (line start, line number)."""
  offsets, pos = [], 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        offsets.append((pos, lineno))
      pos += len(line)
  return np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


class JsonSource:
  """Conversation or preference records from a `.json` list or a `.jsonl` file (one record per line).

  JSONL is indexed lazily: one pass records the byte offset of each line, and `source[i]` reads and
  parses only line i, so a malformed line is a bad sample, not a failed load. Relative image paths are
  resolved against `image_root` (default: the data file's folder).
  """

  def __init__(self, path: PathLike, image_root: PathLike | None = None):
    self.path = pathlib.Path(path)
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

  def _raw(self, index: int) -> tuple[Any, str]:
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

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw, default_id = self._raw(index)
    return parse_record(raw, default_id=default_id, image_root=self.image_root)

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


class ArrayRecordSource:
  """Records stored by `write_array_record` (msgpack maps, image bytes inline) in ArrayRecord files."""

  def __init__(self, paths: PathLike | Sequence[PathLike], image_root: PathLike | None = None):
    import grain

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
    if missing:
      raise MissingPathError(f"ArrayRecord files not found: {missing}")
    self.image_root = image_root
    self._source = grain.sources.ArrayRecordDataSource([os.fspath(p) for p in paths])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    default_id = f"record[{index}]"
    try:
      raw = msgpack.unpackb(self._source[index], raw=False)
    except ValueError as e:  # every msgpack decoding error is a ValueError
      raise BadSampleError(default_id, f"record is not valid msgpack ({e})") from None
    return parse_record(raw, default_id=default_id, image_root=self.image_root)

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self)} records)"


class TfdsSource:
  """A TFDS dataset's random-access source (`tfds.data_sources.load`), records mapped by `to_record`.

  `to_record(example) -> dict` turns a TFDS example into a conversation or preference record (raw,
  as accepted by `parse_record`; image arrays or encoded bytes both work). `tensorflow-datasets` is an
  optional dependency, imported only here.
  """

  def __init__(self, name: str, split: str, to_record: Callable[[dict[str, Any]], Mapping[str, Any]], *,
               data_dir: PathLike | None = None):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise MissingDependencyError("TfdsSource needs TensorFlow Datasets: pip install tensorflow-datasets "
                        "(or convert the data to JSONL / ArrayRecord and use JsonSource / ArrayRecordSource)") from None
    self._source = tfds.data_sources.load(name, split=split, data_dir=data_dir)
    self._to_record = to_record
    self.name = f"{name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = dict(self._to_record(self._source[index]))
    image = raw.get("image")
    if isinstance(image, np.ndarray):
      raw["image"] = Image.fromarray(image)
    return parse_record(raw, default_id=f"{self.name}[{index}]")
