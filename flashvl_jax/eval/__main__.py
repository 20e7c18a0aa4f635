"""Evaluates a Flash-VL checkpoint on benchmark files.

  python -m flashvl_jax.eval CKPT --data MMBench_DEV_EN.tsv OCRBench.tsv [--out eval_results] [--task auto]

Reads VLMEvalKit-style TSV (base64 images, option columns A, B, ...) or JSONL (image paths) files, builds each
item's prompt for its task type (multiple choice, VQA, OCR, document VQA), generates greedy answers through the
continuous-batching engine, scores them, writes `<out>/<stem>.predictions.jsonl`, and prints `accuracy: 0.NNNN`
per file and a markdown table (also in `<out>/results.md`). A rerun skips the items already predicted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Sequence

from flashvl_jax.api import FlashVL, default_dtype
from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.compilation_cache import enable_compilation_cache
from flashvl_jax.engine import Engine
from flashvl_jax.errors import UserError
from flashvl_jax.eval.benchmarks import read_items
from flashvl_jax.eval.prompts import TASKS
from flashvl_jax.eval.runner import FileResult, check_settings, evaluate_file

SCORE_NAMES = {"anls": "ANLS"}


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m flashvl_jax.eval", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", help="an Orbax checkpoint written by `convert`, or a Hugging Face directory")
  parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="benchmark files (.tsv, .jsonl)")
  parser.add_argument("--format", choices=("tsv", "jsonl"), help="file format (default: from the suffix)")
  parser.add_argument("--task", choices=("auto", *TASKS), default="auto",
                      help="scoring for every item (auto: multiple choice when an item has options, ocr for "
                           "OCRBench files, anls for DocVQA/InfoVQA files, else vqa)")
  parser.add_argument("--out", default="eval_results", help="folder for predictions and results (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=8, help="decode slots of the engine (default: %(default)s)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--max-seq-len", type=int, default=4096,
                      help="positions per slot: prompt (image tokens included) + answer (default: %(default)s)")
  parser.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="compute dtype (auto: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="persistent compilation cache (default $JAX_COMPILATION_CACHE_DIR)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_debug_flag(parser)
  args = parser.parse_args(argv)
  return run_cli(lambda: run(args), debug=args.debug)


def results_table(results: list[FileResult]) -> str:
  lines = ["| file | task | items | score | failed | no option named |", "|---|---|---|---|---|---|"]
  for r in results:
    tasks = ", ".join(f"{t} {n}" if len(r.tasks) > 1 else t for t, n in sorted(r.tasks.items()))
    lines.append(f"| {r.name} | {tasks} | {r.items} | {r.score:.4f} | {r.failed} | {r.unmatched} |")
  return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
  if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_seq_len <= args.max_new_tokens:
    raise UserError(f"--batch-size ({args.batch_size}) and --max-new-tokens ({args.max_new_tokens}) must be >= 1 "
                    f"and --max-seq-len ({args.max_seq_len}) larger than --max-new-tokens")
  data = [pathlib.Path(p) for p in args.data]
  dtype = default_dtype() if args.dtype == "auto" else args.dtype
  settings = {"checkpoint": str(pathlib.Path(args.checkpoint).resolve()), "dtype": dtype}
  out = pathlib.Path(args.out)
  for path in data:  # every file readable, no earlier predictions at odds, before the model loads (minutes)
    read_items(path, args.format)
    check_settings(out, path, {**settings, "task": args.task, "max_new_tokens": args.max_new_tokens}, args.overwrite)
  enable_compilation_cache(args.compilation_cache)
  model = FlashVL.from_pretrained(args.checkpoint, dtype=dtype, max_length=args.max_seq_len - args.max_new_tokens)
  engine = Engine(model.module, slots=args.batch_size, max_seq_len=args.max_seq_len,
                  stop_ids=model.tokenizer.eos_ids, mesh=model.mesh, max_queue=2 * args.batch_size)
  results = []
  engine.start()
  try:
    for path in data:
      start = time.perf_counter()
      result = evaluate_file(model, engine, path, out, fmt=args.format, task=args.task,
                             max_new_tokens=args.max_new_tokens, settings=settings, overwrite=args.overwrite,
                             progress=not args.no_progress)
      name = "/".join(SCORE_NAMES.get(t, "accuracy") for t in sorted(result.tasks))
      print(f"{path.name}: {name}: {result.score:.4f} ({result.items} items, {time.perf_counter() - start:.0f} s)",
            flush=True)
      results.append(result)
  finally:
    engine.stop()
  table = results_table(results)
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
  print(table)


if __name__ == "__main__":
  sys.exit(main())
