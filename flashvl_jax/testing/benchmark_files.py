"""Small benchmark files with known answers, drawn from the synthetic visual-question task, in the formats
`python -m flashvl_jax.eval` reads: a VLMEvalKit-style multiple-choice TSV (base64 images, options A-D, one row
reusing another's image by index), a VQA JSONL (image files) and an OCRBench-style TSV (answers as a list)."""

from __future__ import annotations

import base64
import csv
import json
import pathlib

import numpy as np

from flashvl_jax.data.synthetic import COLOURS, SyntheticConfig, SyntheticVQA
from flashvl_jax.testing.stored_datasets import png


def _samples(count: int, question_type: str, image_size: int, seed: int) -> list[dict]:
  """Held-out samples (the eval split) of one question type; each file draws with its own seed."""
  vqa = SyntheticVQA(count, "eval", SyntheticConfig(image_size=image_size, question_types=(question_type,), seed=seed))
  return [vqa[i] for i in range(count)]


def write_choice_tsv(path: str | pathlib.Path, count: int = 24, image_size: int = 64) -> pathlib.Path:
  """Colour questions with four colour options; the answer letter is spread evenly over A-D."""
  rng = np.random.default_rng(0)
  path = pathlib.Path(path)
  rows = []
  for i, sample in enumerate(_samples(count, "colour", image_size, seed=1)):
    wrong = [c for c in COLOURS if c != sample["answer"]]
    options = [str(c) for c in rng.choice(wrong, 3, replace=False)]
    options.insert(i % 4, sample["answer"])
    image = base64.b64encode(png(sample["image"])).decode()
    rows.append({"index": str(i), "image": image, "question": sample["messages"][0]["content"],
                 **dict(zip("ABCD", options)), "answer": "ABCD"[i % 4], "category": "colour"})
  rows.append({**rows[0], "index": str(count), "image": "0"})  # VLMEvalKit's reference to row 0's image
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
    writer.writeheader()
    writer.writerows(rows)
  return path


def write_vqa_jsonl(path: str | pathlib.Path, count: int = 16, image_size: int = 64) -> pathlib.Path:
  path = pathlib.Path(path)
  (path.parent / "images").mkdir(parents=True, exist_ok=True)
  lines = []
  for i, sample in enumerate(_samples(count, "colour", image_size, seed=2)):
    sample["image"].save(path.parent / "images" / f"vqa{i}.png")
    lines.append(json.dumps({"id": f"vqa{i}", "image": f"images/vqa{i}.png",
                             "question": sample["messages"][0]["content"], "answer": sample["answer"]}))
  path.write_text("\n".join(lines) + "\n")
  return path


def write_ocr_tsv(path: str | pathlib.Path, count: int = 8, image_size: int = 64) -> pathlib.Path:
  """Written-word questions; `answer` holds a list of accepted strings, as OCRBench's TSV does."""
  path = pathlib.Path(path)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(["index", "image", "question", "answer", "category"])
    for i, sample in enumerate(_samples(count, "word", image_size, seed=3)):
      writer.writerow([i, base64.b64encode(png(sample["image"])).decode(), sample["messages"][0]["content"],
                       str([sample["answer"], sample["answer"].upper()]), "Regular Text Recognition"])
  return path
