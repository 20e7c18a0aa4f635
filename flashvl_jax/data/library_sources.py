"""Sources read through another library: a TensorFlow Datasets dataset (`tfds.data_source`, random access over
its ArrayRecord files; reading needs no TensorFlow) and parquet files (pyarrow; e.g. a Hugging Face `datasets`
export, images stored as `{"bytes", "path"}`). Both are optional dependencies, imported when a source is made.
"""

from __future__ import annotations

import collections
import os
import pathlib
import threading
from typing import Any

import numpy as np

from flashvl_jax.data.fields import Fields
from flashvl_jax.data.sources import DataError, PathLike, RecordSource, data_files
from flashvl_jax.errors import MissingDependencyError, MissingPathError


class TfdsSource(RecordSource):
  """Split `split` of the TFDS dataset `name` (prepared with `file_format="array_record"`) under `data_dir`.

  Examples are read one at a time and mapped by `fields` (TFDS text arrives as bytes; images are left encoded).
  """

  def __init__(self, name: str, split: str = "train", *, data_dir: PathLike | None = None,
               fields: Fields | None = None):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise MissingDependencyError("data.source tfds needs TensorFlow Datasets: pip install -e '.[tfds]' (or "
                                   "pip install tensorflow-datasets); TensorFlow itself is not needed") from None
    if data_dir is not None and not os.path.isdir(data_dir):
      raise MissingPathError(f"TFDS data_dir {os.fspath(data_dir)!r} does not exist")
    self.fields = fields or Fields()
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      # Images stay encoded: the pipeline decodes them, where a corrupt one is a bad sample like any other.
      features = builder.info.features
      image = features[self.fields.image] if self.fields.image in features.keys() else None
      decoders = {self.fields.image: tfds.decode.SkipDecoding()} if isinstance(image, tfds.features.Image) else None
      self._source = builder.as_data_source(split=split, decoders=decoders)
    except (tfds.core.registered.DatasetNotFoundError, AssertionError, ValueError, KeyError, FileNotFoundError,
            NotImplementedError) as e:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if "format" in reason.lower():  # prepared as TFRecord, which needs TensorFlow to read
        reason += "; flashvl_jax reads TFDS datasets prepared with file_format='array_record'"
      raise DataError(f"TFDS dataset {name!r} split {split!r} cannot be opened from "
                      f"{os.fspath(data_dir) if data_dir else 'the default data_dir'}: {reason}") from None
    self.name = f"{name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def raw_record(self, index: int) -> tuple[Any, str]:
    return dict(self._source[index]), f"{self.name}[{index}]"

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} records)"


class ParquetSource(RecordSource):
  """Rows of parquet files as records, mapped by `fields`.

  Random access reads whole row groups (parquet's unit of decoding); the most recent `cached_row_groups` stay in
  memory, so a shuffled pass decodes about one row group per record when row groups are large: write small ones
  (`datasets` uses ~100-row groups for image data) or convert to ArrayRecord for big shuffled runs.
  """

  def __init__(self, path: PathLike, image_root: PathLike | None = None, fields: Fields | None = None, *,
               cached_row_groups: int = 8):
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise MissingDependencyError("data.source parquet needs pyarrow: pip install -e '.[parquet]' (or pip "
                                   "install pyarrow)") from None
    self.files = data_files(path, "*.parquet")
    self.image_root = pathlib.Path(image_root) if image_root is not None else None
    self.fields = fields or Fields()
    groups = []  # (file index, row group, its first row overall, the file's first row overall)
    total = 0
    for file_index, file in enumerate(self.files):
      file_start = total
      try:
        reader = pq.ParquetFile(file)
      except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataError(f"{file} is not a readable parquet file ({e})") from None
      for group in range(reader.num_row_groups):
        groups.append((file_index, group, total, file_start))
        total += reader.metadata.row_group(group).num_rows
    self._groups = groups
    self._starts = np.asarray([g[2] for g in groups], dtype=np.int64)
    self._len = total
    self._cache: collections.OrderedDict[int, list[dict[str, Any]]] = collections.OrderedDict()
    self._cache_size = cached_row_groups
    self._lock = threading.Lock()  # grain reads from several threads

  def __len__(self) -> int:
    return self._len

  def __getstate__(self) -> dict[str, Any]:  # grain worker processes get a copy without the lock and the cache
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_cache")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _lock=threading.Lock(), _cache=collections.OrderedDict())

  def _rows(self, group_index: int) -> list[dict[str, Any]]:
    with self._lock:
      if group_index in self._cache:
        self._cache.move_to_end(group_index)
        return self._cache[group_index]
    file_index, group = self._groups[group_index][:2]
    # A fresh reader per read (one reader is not meant for several threads), outside the lock: threads decode at once
    import pyarrow.parquet as pq  # imported in __init__ already
    rows = pq.ParquetFile(self.files[file_index]).read_row_group(group).to_pylist()
    with self._lock:
      self._cache[group_index] = rows
      if len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return rows

  def raw_record(self, index: int) -> tuple[Any, str]:
    if not 0 <= index < self._len:
      raise IndexError(index)
    group_index = int(np.searchsorted(self._starts, index, side="right")) - 1
    file_index, _, start, file_start = self._groups[group_index]
    return self._rows(group_index)[index - start], f"{self.files[file_index].name}[{index - file_start}]"

  def __repr__(self) -> str:
    return f"ParquetSource({len(self.files)} files, {len(self)} records)"
