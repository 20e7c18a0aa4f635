"""Grain input pipelines: records of a random-access source -> fixed-shape training batches.

  indices of the source -> shard by process -> shuffle(seed) -> repeat(num_epochs)
    -> read + decode + tile + tokenize (`encode_record` -> `Processor.encode_example`)   [threads / workers]
    -> drop bad samples (`SkipStats`) or fail on them
    -> pack several examples per row (optional)
    -> batch (fixed shapes: a short last batch is padded with empty rows unless dropped)

Pixels stay uint8 (normalised on device). Every step is deterministic, so the same seed gives the same
batches and the iterator's `get_state()` / `set_state()` resumes exactly.

Batch arrays are the `Processor`'s with a leading batch dimension B. Preference records (DPO) give
`chosen_{input_ids,attention_mask,loss_mask}` and `rejected_{...}` plus one copy of the image arrays.
Packing adds `segment_ids` (1, 2, ... per example, 0 on padding) and `position_ids` (restarting at 0 in each
example). Images pack along the tile axis: a row holds at most `max_tiles` tiles and `max_image_tokens`
image tokens in all, each example's `image_patch_index` is shifted to its tiles, and the k-th image
placeholder of the row still takes the k-th image token, so the model needs no change. Packing is for
conversation (SFT) records only.

Bad samples (unreadable or malformed records, corrupt / truncated / empty / missing images, decompression
bombs, conversations without an assistant turn, prompts longer than `max_length`, a record of the other kind
than `records`) raise `ValueError`s while encoding. With `bad_sample_policy="skip"` they are counted by kind in
`SkipStats` (the first few are logged with their id and reason) and dropped before batching, so batch shapes
never change; with `"fail"` the pipeline raises `BadSampleError` naming the sample. Skipping never spins: when
`SkipLimits.max_consecutive` samples in a row are bad, or more than `max_fraction` of those read so far (once
`min_seen` have been read), the pipeline raises `DataError` with the commonest reasons. Skipping happens in the
consuming process, so the counts are complete with worker processes too. The counts are not part of the
iterator state (after a resume they count from zero).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from typing import Any, Literal, Mapping

import grain
import jax
import numpy as np

from flashvl_jax.data.sources import BadSampleError, DataError
from flashvl_jax.preprocess.image import ImageError, load_image
from flashvl_jax.preprocess.processor import Processor, PromptTooLongError
from flashvl_jax.preprocess.prompt import normalize_messages

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["skip", "fail"]
RecordKind = Literal["conversation", "preference"]
TEXT_KEYS = ("input_ids", "attention_mask", "loss_mask")
SKIP_KINDS = ("too_long", "bad_image", "bad_record")  # what skipped samples are counted by
LOGGED_SKIPS = 20  # skipped samples logged one by one; the rest are only counted


def encode_record(record: Mapping[str, Any], processor: Processor) -> dict[str, np.ndarray]:
  """One conversation or preference record (see `data.sources`) -> the model's arrays.

  Raises `ValueError` (`BadSampleError`, `ImageError`, `PromptTooLongError`, ...) for a sample that cannot
  be trained on.
  """
  if "chosen" in record:
    image = None if record.get("image") is None else load_image(record["image"])
    pair = {}
    for key in ("chosen", "rejected"):
      messages = [*record["prompt"], {"role": "assistant", "content": record[key]}]
      pair[key] = processor.encode_example(image, messages)
    image_arrays = {k: v for k, v in pair["chosen"].items() if k not in TEXT_KEYS}
    return {f"{key}_{k}": pair[key][k] for key in pair for k in TEXT_KEYS} | image_arrays
  sample_id = str(record.get("id", "?"))
  messages = record.get("messages")
  if messages is None:
    raise BadSampleError(sample_id, "the record has neither 'messages' nor 'chosen'/'rejected'")
  if not any(role == "assistant" for role, _ in normalize_messages(messages)):
    raise BadSampleError(sample_id, "the conversation has no assistant turn, so there is nothing to train on")
  return processor.encode_example(record.get("image"), messages)


def skip_kind(error: Exception) -> str:
  """The `SKIP_KINDS` entry a bad sample's error is counted under."""
  if isinstance(error, PromptTooLongError):
    return "too_long"
  return "bad_image" if isinstance(error, ImageError) else "bad_record"


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a bad sample between encoding (in threads / workers) and the skipping filter."""

  sample_id: str
  kind: str  # one of SKIP_KINDS
  reason: str


@dataclasses.dataclass(frozen=True)
class SkipLimits:
  """When skipping means the data (or a setting such as max_length) is broken, not a few samples."""

  max_consecutive: int = 1000  # bad samples in a row
  max_fraction: float = 0.5  # of the samples read so far ...
  min_seen: int = 100  # ... once this many have been read


class SkipStats:
  """What the pipeline skipped: `total`, `counts` per kind (`SKIP_KINDS`), `reasons` per sample id (first
  1000), `examples` (one sample id and reason per kind), and `seen` (samples read, good or bad)."""

  def __init__(self, max_reasons: int = 1000):
    self._lock = threading.Lock()
    self._max_reasons = max_reasons
    self.total = 0
    self.seen = 0
    self.consecutive = 0
    self.counts: collections.Counter[str] = collections.Counter()
    self.reasons: dict[str, str] = {}
    self.examples: dict[str, tuple[str, str]] = {}

  def add(self, skipped: Skipped) -> None:
    with self._lock:
      self.total += 1
      self.seen += 1
      self.consecutive += 1
      self.counts[skipped.kind] += 1
      self.examples.setdefault(skipped.kind, (skipped.sample_id, skipped.reason))
      if len(self.reasons) < self._max_reasons:
        self.reasons[skipped.sample_id] = skipped.reason

  def add_good(self) -> None:
    with self._lock:
      self.seen += 1
      self.consecutive = 0

  def check(self, limits: SkipLimits) -> None:
    """Raises `DataError` when `limits` say the data is broken."""
    if self.consecutive >= limits.max_consecutive:
      what = f"{self.consecutive} samples in a row were bad (limit {limits.max_consecutive})"
    elif self.seen >= limits.min_seen and self.total > limits.max_fraction * self.seen:
      what = f"{self.total} of the {self.seen} samples read were bad (limit {limits.max_fraction:.0%})"
    else:
      return
    raise DataError(f"stopped: {what}. Most common reasons: {self.summary()}. Fix the data or the setting the "
                    "reasons name (e.g. data.max_length); data.max_consecutive_skips and data.max_skip_fraction set "
                    "the limits")

  def summary(self) -> str:
    """'too_long: 12 (e.g. sample 'a': ...); bad_image: 3 (...)', commonest first."""
    return "; ".join(f"{kind}: {count} (e.g. sample {self.examples[kind][0]!r}: {self.examples[kind][1]})"
                     for kind, count in self.counts.most_common())

  def __repr__(self) -> str:
    return f"SkipStats(total={self.total}, seen={self.seen}, counts={dict(self.counts)})"


class _EncodeIndex:
  """Source index -> encoded example, or `Skipped` (policy 'skip') for a bad sample. Picklable for workers."""

  def __init__(self, source: Any, processor: Processor, policy: BadSamplePolicy, records: RecordKind):
    self.source, self.processor, self.policy, self.records = source, processor, policy, records

  def __call__(self, index: int) -> dict[str, np.ndarray] | Skipped:
    sample_id = f"index {index}"
    try:
      record = self.source[index]
      sample_id = str(record.get("id", sample_id))
      kind = "preference" if "chosen" in record else "conversation"
      if kind != self.records:
        raise BadSampleError(sample_id, f"a {kind} record among {self.records} records (a file mixes SFT "
                             "conversations and DPO preference pairs); keep one kind per file")
      return encode_record(record, self.processor)
    except ValueError as e:  # the processor's and the sources' input errors (see module docstring)
      sample_id = getattr(e, "sample_id", sample_id)
      reason = getattr(e, "reason", str(e))
      if self.policy == "fail":
        raise BadSampleError(sample_id, f"{reason} (bad_sample_policy='skip' skips and counts such samples)") from e
      return Skipped(sample_id, skip_kind(e), reason)


def _keep_good(element: Any, stats: SkipStats, limits: SkipLimits) -> bool:
  if not isinstance(element, Skipped):
    stats.add_good()
    return True
  stats.add(element)
  if stats.total <= LOGGED_SKIPS:
    logger.warning("skipping sample %s (%s): %s%s", element.sample_id, element.kind, element.reason,
                   "; further skipped samples are counted, not logged" if stats.total == LOGGED_SKIPS else "")
  stats.check(limits)
  return False


def _trim_for_packing(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Cuts an example to its real length, tiles and image tokens: the pieces grain's packer concatenates."""
  n = int(example["attention_mask"].sum())
  return {"input_ids": example["input_ids"][:n], "loss_mask": example["loss_mask"][:n],
          "pixel_values": example["pixel_values"][:int(example["tile_mask"].sum())],
          "image_patch_index": example["image_patch_index"][:int(example["num_image_tokens"])]}


def _finish_packed_row(row: dict[str, np.ndarray], patches_per_tile: int) -> dict[str, np.ndarray]:
  """Model arrays of one packed row: masks from segment ids, patch indices shifted to each example's tiles."""
  segment_ids = row["input_ids_segment_ids"]
  tile_segments = row["pixel_values_segment_ids"]
  token_segments = row["image_patch_index_segment_ids"]
  is_token = token_segments > 0
  # Tiles are appended example by example, so an example's first tile follows all tiles of earlier examples.
  tiles_before = ((tile_segments[None, :] > 0) & (tile_segments[None, :] < token_segments[:, None])).sum(1)
  patch_index = row["image_patch_index"] + (is_token * tiles_before * patches_per_tile)[:, None]
  return {
      "input_ids": row["input_ids"],
      "attention_mask": (segment_ids > 0).astype(np.int32),
      "loss_mask": row["loss_mask"],
      "segment_ids": segment_ids,
      "position_ids": row["input_ids_positions"],
      "pixel_values": row["pixel_values"],
      "tile_mask": tile_segments > 0,
      "image_patch_index": patch_index.astype(np.int32),
      "num_image_tokens": np.asarray(is_token.sum(), np.int32),
  }


def _pack(ds: grain.IterDataset, processor: Processor, batch_size: int) -> grain.IterDataset:
  cfg = processor.config
  lengths = {"input_ids": processor.max_length, "loss_mask": processor.max_length,
             "pixel_values": processor.max_tiles, "image_patch_index": processor.max_image_tokens}
  padding = {"input_ids": processor.tokenizer.pad_id, "loss_mask": None, "pixel_values": None,
             "image_patch_index": None}
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.map(_trim_for_packing), length_struct=lengths, padding_struct=padding, num_packing_bins=batch_size,
      shuffle_bins=False)
  return packed.map(functools.partial(_finish_packed_row, patches_per_tile=cfg.vision.num_patches))


def make_dataset(source: Any, processor: Processor, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = 1, shard_index: int | None = None, shard_count: int | None = None,
                 num_threads: int = 2, num_workers: int = 0, prefetch: int = 0, drop_remainder: bool = True,
                 packing: bool = False, records: RecordKind = "conversation",
                 bad_sample_policy: BadSamplePolicy = "skip", skip_stats: SkipStats | None = None,
                 skip_limits: SkipLimits = SkipLimits()) -> grain.IterDataset:
  """A grain dataset of batches from `source` (anything with `len` and `[index]` giving records).

  Args:
    source: random-access records, e.g. `JsonSource`, `ArrayRecordSource`, `SyntheticVQA`.
    processor: encodes a record's image and conversation into fixed-shape arrays.
    batch_size: examples (or packed rows) per batch, per process.
    seed: shuffling seed; the same seed gives the same batches.
    shuffle: shuffle the (sharded) source order, reshuffled each epoch.
    num_epochs: passes over the shard; None repeats forever.
    shard_index, shard_count: this process's disjoint slice `index::count` of the source (default:
      `jax.process_index()` of `jax.process_count()`). Shards differ in length by at most one example.
    num_threads: grain read threads encoding examples (0: in the consuming thread).
    num_workers: grain worker processes (`mp_prefetch`); they need `absl.flags.FLAGS.mark_as_parsed()` and
      a `if __name__ == "__main__"` guard. On few cores threads are faster for PIL work.
    prefetch: batches prepared ahead in a background thread (0: none).
    drop_remainder: drop a short last batch; otherwise it is padded with empty rows (all masks zero).
    packing: pack several examples per row (see the module docstring).
    records: the kind every record must be: "conversation" (SFT) or "preference" (DPO); a record of the
      other kind is a bad sample.
    bad_sample_policy: "skip" (log, count in `skip_stats`, drop) or "fail" (raise `BadSampleError`).
    skip_stats: where skipped samples are counted; pass one to read the counts.
    skip_limits: when skipping stops the pipeline with a `DataError` (policy "skip").

  Returns:
    A `grain.IterDataset`; `iter()` of it is a `grain.DatasetIterator` with `get_state()` / `set_state()`.
  """
  if bad_sample_policy not in ("skip", "fail"):
    raise ValueError(f"bad_sample_policy must be 'skip' or 'fail', got {bad_sample_policy!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if packing and records == "preference":
    raise ValueError("packing=True supports conversation (SFT) records; batch preference (DPO) records with "
                     "packing=False")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
  if len(source) < shard_count:
    raise ValueError(f"the source has {len(source)} records, fewer than the {shard_count} shards")
  stats = SkipStats() if skip_stats is None else skip_stats

  ds = grain.MapDataset.range(len(source))[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(_EncodeIndex(source, processor, bad_sample_policy, records))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1)))
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  ds = ds.filter(functools.partial(_keep_good, stats=stats, limits=skip_limits))
  if packing:
    ds = _pack(ds, processor, batch_size)
  batch_fn = None if drop_remainder else functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds
