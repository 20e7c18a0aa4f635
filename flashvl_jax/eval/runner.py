"""Runs a benchmark file through the batching engine and scores it, resumably.

Predictions go to `<out>/<file stem>.predictions.jsonl` as each item finishes, one JSON line per item; a rerun
with the same settings (`<stem>.settings.json`) skips the items already there, so an interrupted evaluation
continues where it stopped. At most `2 x slots` items are encoded ahead of the engine, so memory does not grow
with the file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import queue
from typing import Any, Callable, Iterator

import tqdm

from flashvl_jax.api import FlashVL
from flashvl_jax.engine import LENGTH, STOP, Engine, Request
from flashvl_jax.errors import PathExistsError, UserError
from flashvl_jax.eval import scoring
from flashvl_jax.eval.benchmarks import Item, read_items
from flashvl_jax.eval.prompts import build_prompt, task_of
from flashvl_jax.preprocess.image import load_image


@dataclasses.dataclass
class FileResult:
  name: str
  items: int
  score: float  # mean over items (accuracy, or ANLS)
  tasks: dict[str, int]  # items per task type
  failed: int  # items that could not run (bad image, prompt too long): scored 0
  unmatched: int  # multiple-choice answers naming no single option: scored 0


def score_item(task: str, prediction: str, item: Item) -> float:
  if task == "mcq":
    return scoring.score_choice(prediction, item.answers, item.options)
  if task == "ocr":
    return scoring.score_substring(prediction, item.answers, item.category)
  if task == "anls":
    return scoring.score_anls(prediction, item.answers)
  return scoring.score_exact(prediction, item.answers)


def _finished(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The predictions already written, by item id (a line cut off by an interruption is dropped: its item runs
  again)."""
  done = {}
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      done[record["id"]] = record
  return done


def check_settings(out: pathlib.Path, data: pathlib.Path, settings: dict[str, Any], overwrite: bool = False) -> None:
  """Raises PathExistsError if `out` holds predictions for `data` made with other `settings` (checked again by
  `evaluate_file`; the CLI calls it first, before the model loads)."""
  path = out / f"{data.stem}.settings.json"
  settings = {**settings, "data": str(data.resolve())}
  if path.exists() and not overwrite:
    saved = json.loads(path.read_text())
    if saved != settings:
      changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
      raise PathExistsError(f"{path.parent} holds predictions made with other settings ({', '.join(changed)} "
                            "differ); pass --overwrite to start again or choose another --out")


def evaluate_file(model: FlashVL, engine: Engine, data: pathlib.Path, out: pathlib.Path, *, fmt: str | None,
                  task: str, max_new_tokens: int, settings: dict[str, Any], overwrite: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> FileResult:
  """Scores `data`, continuing earlier predictions in `out` made with the same `settings` (checkpoint, dtype, ...:
  whatever the caller records; task and max_new_tokens are added)."""
  items = read_items(data, fmt)
  settings = {**settings, "task": task, "max_new_tokens": max_new_tokens}
  out.mkdir(parents=True, exist_ok=True)
  predictions = out / f"{data.stem}.predictions.jsonl"
  check_settings(out, data, settings, overwrite)
  if overwrite:
    predictions.unlink(missing_ok=True)
  (out / f"{data.stem}.settings.json").write_text(json.dumps({**settings, "data": str(data.resolve())}, indent=1))
  done = _finished(predictions)
  # Rewritten without a line an interruption cut off, so that appended records start on a line of their own.
  predictions.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
  todo = [item for item in items if item.id not in done]
  if done and todo:
    log(f"{data.name}: {len(done)} of {len(items)} items already scored in {predictions}; running the other "
        f"{len(todo)}")
  with open(predictions, "a", encoding="utf-8") as sink, \
       tqdm.tqdm(total=len(items), initial=len(items) - len(todo), desc=data.name, unit="item",
                 disable=not progress, dynamic_ncols=True) as bar:
    for record in _predict(model, engine, todo, data.name, task, max_new_tokens):
      done[record["id"]] = record
      sink.write(json.dumps(record) + "\n")
      sink.flush()
      bar.update()
  records = [done[item.id] for item in items]
  return FileResult(data.name, len(items), sum(r["score"] for r in records) / len(records),
                    dict(collections.Counter(r["task"] for r in records)), sum("error" in r for r in records),
                    sum(r.get("choice", "") is None for r in records))


def _predict(model: FlashVL, engine: Engine, items: list[Item], file_name: str, task: str,
             max_new_tokens: int) -> Iterator[dict[str, Any]]:
  """Each item's prediction record, in the order they finish; keeps the engine's slots busy."""
  finished: queue.Queue[tuple[int, list[int], str]] = queue.Queue()
  outputs: dict[int, list[int]] = collections.defaultdict(list)
  running: dict[int, tuple[Item, str, str]] = {}  # engine request index -> (item, its task, its prompt)
  window = 2 * engine.num_slots
  pending = iter(enumerate(items))
  in_flight = 0

  def collect(new: list[int], reason: str | None, index: int) -> None:
    outputs[index].extend(new)
    if reason is not None:
      finished.put((index, outputs.pop(index), reason))

  def record(item: Item, item_task: str, prompt: str, **fields) -> dict[str, Any]:
    return {"id": item.id, "task": item_task, "prompt": prompt, "answers": list(item.answers), **fields}

  while True:
    while in_flight < window:
      index, item = next(pending, (None, None))
      if item is None:
        break
      item_task = task_of(item, file_name, task)
      prompt = build_prompt(item, item_task)
      try:
        image = None if item.image is None else load_image(item.image)
        example = model.processor.encode_example(image, [{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True)
        ids = example["input_ids"][example["attention_mask"].astype(bool)]
        request = Request(str(index), ids, max_new_tokens, on_tokens=lambda n, r, i=index: collect(n, r, i),
                          pixel_values=example.get("pixel_values") if image is not None else None,
                          image_patch_index=example.get("image_patch_index") if image is not None else None)
        engine.check(request)
      except UserError as e:  # a bad image, a prompt longer than a slot: scored 0 and reported
        yield record(item, item_task, prompt, prediction="", score=0.0, error=str(e))
        continue
      running[index] = (item, item_task, prompt)
      engine.submit(request)
      in_flight += 1
    if not in_flight:
      return
    index, ids, reason = finished.get()
    in_flight -= 1
    if reason not in (STOP, LENGTH):
      raise RuntimeError(f"the engine ended item {running[index][0].id!r} with {reason!r} (see the log above); "
                         "the predictions written so far are kept: rerun to continue")
    item, item_task, prompt = running.pop(index)
    text = model.tokenizer.decode([t for t in ids if t not in engine.stop_ids]).strip()
    fields = {"prediction": text, "score": score_item(item_task, text, item)}
    if item_task == "mcq":
      fields["choice"] = scoring.extract_choice(text, item.options)
    yield record(item, item_task, prompt, **fields)

