"""The run's data sources, opened from `data.*` before the model is built: a missing file, a TFDS split that is not
there or a field mapping that does not fit the records stops the run at once, not after minutes of loading."""

from __future__ import annotations

import dataclasses
from typing import Any

from flashvl_jax.data.library_sources import ParquetSource, TfdsSource
from flashvl_jax.data.sources import ArrayRecordSource, DataError, JsonSource, data_files
from flashvl_jax.data.synthetic import SyntheticPreferences, SyntheticVQA
from flashvl_jax.errors import MissingPathError
from flashvl_jax.train.config import DataConfig


@dataclasses.dataclass
class Sources:
  train: Any  # random access records (`len`, `[i]`)
  eval: Any | None


def _open(d: DataConfig, key: str, path: str, split: str) -> Any:
  """The source at `path`; an error names the config key it came from (`key`)."""
  try:
    return _source(d, path, split)
  except (MissingPathError, DataError) as e:
    raise type(e)(f"{key}: {e}") from None


def _source(d: DataConfig, path: str, split: str) -> Any:
  if d.source == "json":
    return JsonSource(path, d.image_root, d.fields)
  if d.source == "arrayrecord":
    return ArrayRecordSource(data_files(path, "*.array_record*"), d.image_root, d.fields)
  if d.source == "parquet":
    return ParquetSource(path, d.image_root, d.fields)
  return TfdsSource(path, split, data_dir=d.tfds_data_dir, fields=d.fields)


def open_sources(d: DataConfig, records: str = "conversation") -> Sources:
  """The train and (if configured) eval sources for `records` ('conversation' or 'preference', the objective's);
  stored records are checked against `data.fields`."""
  if d.source == "synthetic":
    view = SyntheticPreferences if records == "preference" else lambda vqa: vqa
    return Sources(view(SyntheticVQA(d.train_size, "train", d.synthetic)),
                   view(SyntheticVQA(d.eval_size, "eval", d.synthetic)) if d.eval_size else None)
  train = _open(d, "data.path", d.path, d.split)
  train.check_fields(f"data.path {d.path}")
  held_out = d.eval_split if d.source == "tfds" else d.eval_path
  evaluation = None
  if held_out:
    key = "data.eval_split" if d.source == "tfds" else "data.eval_path"
    evaluation = _open(d, key, d.path if d.source == "tfds" else held_out, held_out)
    evaluation.check_fields(f"{key} {held_out}")
  return Sources(train, evaluation)
