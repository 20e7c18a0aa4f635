"""`python -m flashvl_jax.bench --rollouts`: GRPO rollout throughput, the batching engine vs one static `generate`.

One command, one model, the same rollouts both ways: --prompts synthetic visual questions (image + question), each
sampled --group-size times (temperature --temperature), --new-tokens at most per completion.
1. static: one `sampling.generate` call over all prompts x group rows (GRPO's rollout path before the engine):
   every row decodes until the last one stops;
2. engine: `Engine.complete` with one request per completion over --slots decode slots (default: one per
   completion): a finished completion frees its slot at once, and the decode width shrinks as slots empty.
Reported: generated tokens (up to and including the stop id) per second of each, and their ratio; the median of
--repeats timed runs after one untimed run that compiles. A random model (the default) rarely stops early, so
the engine's gain there is nil; a trained checkpoint (--init, e.g. the demo's runs/demo/model) answers and stops.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx

from flashvl_jax import sampling
from flashvl_jax.api import FlashVL, default_dtype
from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.config import PRESETS_BY_SIZE, load_config
from flashvl_jax.data.synthetic import SyntheticVQA
from flashvl_jax.engine import Engine, Request
from flashvl_jax.environment import environment
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.train.grpo import repeat_rows, sample_seed


def load_model(args: argparse.Namespace) -> FlashVL:
  if args.init:
    return FlashVL.from_pretrained(args.init, dtype=args.dtype)
  cfg = load_config(PRESETS_BY_SIZE[args.size][args.variant], [f"dtype={args.dtype}", f"param_dtype={args.dtype}"])
  return FlashVL(FlashVLModel(cfg, rngs=nnx.Rngs(args.seed)))


def rollout_prompts(model: FlashVL, prompts: int, group_size: int) -> dict[str, np.ndarray]:
  """`prompts` synthetic questions with their images, each row repeated `group_size` times (adjacent)."""
  source = SyntheticVQA(prompts, "eval")
  records = [source[i] for i in range(prompts)]
  batch = model.processor([r["image"] for r in records], [r["messages"][:1] for r in records],
                          add_generation_prompt=True)
  return repeat_rows(batch, group_size)


def static_rollouts(model: FlashVL, rows: dict[str, np.ndarray], args: argparse.Namespace) -> list[list[int]]:
  return sampling.generate(model.sampler, **rows, max_new_tokens=args.new_tokens, do_sample=True,
                           temperature=args.temperature, seed=args.seed)


def engine_rollouts(engine: Engine, state: Any, rows: dict[str, np.ndarray],
                    args: argparse.Namespace) -> list[list[int]]:
  params = sampling.SamplingParams(True, args.temperature)
  requests = [Request(str(i), ids[mask.astype(bool)], args.new_tokens, on_tokens=None, pixel_values=pixels,
                      image_patch_index=index, sampling=params, seed=sample_seed(args.seed, 0, i))
              for i, (ids, mask, pixels, index) in enumerate(zip(rows["input_ids"], rows["attention_mask"],
                                                                 rows["pixel_values"], rows["image_patch_index"]))]
  return engine.complete(requests, state)


def measure(run: Callable[[], list[list[int]]], repeats: int) -> dict[str, float]:
  """Tokens per second of `run` (median over `repeats` timed calls, after one that compiles)."""
  tokens = sum(len(c) for c in run())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  return {"tokens": tokens, "seconds": median, "tokens_per_s": tokens / median}


def run(args: argparse.Namespace) -> None:
  env = environment()
  print(f"{env['date']}  {env['device']} x{env['device_count']} ({env['jax_backend']}), CPU {env['cpu']} "
        f"({env['cpu_cores']} cores); jax {env['jax']}, flax {env['flax']}", flush=True)
  model = load_model(args)
  rows = rollout_prompts(model, args.prompts, args.group_size)
  count = len(rows["input_ids"])
  engine = Engine(model.module, slots=args.slots or count, max_queue=count,
                  max_seq_len=int(rows["attention_mask"].sum(1).max()) + args.new_tokens,
                  stop_ids=model.processor.tokenizer.eos_ids)
  static = measure(lambda: static_rollouts(model, rows, args), args.repeats)
  batched = measure(lambda: engine_rollouts(engine, engine.state, rows, args), args.repeats)
  lengths = [len(c) for c in engine_rollouts(engine, engine.state, rows, args)]
  ratio = batched["tokens_per_s"] / static["tokens_per_s"]
  print(f"{args.prompts} prompts x {args.group_size} = {count} completions, <= {args.new_tokens} tokens each "
        f"(mean {np.mean(lengths):.1f}, min {min(lengths)}), {engine.num_slots} engine slots")
  print(f"static generate: {static['tokens_per_s']:9.1f} tok/s  ({static['tokens']} tokens in {static['seconds']:.2f} s)")
  print(f"engine:          {batched['tokens_per_s']:9.1f} tok/s  ({batched['tokens']} tokens in "
        f"{batched['seconds']:.2f} s)  {ratio:.2f}x static", flush=True)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps(dict(environment=env, settings=settings, static=static, engine=batched,
                                         ratio=ratio, completion_lengths=lengths), indent=2))


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m flashvl_jax.bench --rollouts", description=__doc__.split("\n\n")[0])
  parser.add_argument("--init", help="a checkpoint (anything FlashVL.from_pretrained loads); default: random")
  parser.add_argument("--size", choices=tuple(PRESETS_BY_SIZE), default="tiny", help="random model's presets")
  parser.add_argument("--variant", choices=("static", "dynamic", "iss"), default="static")
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--group-size", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--slots", type=int, default=0, help="engine decode slots (0: one per completion)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", type=pathlib.Path, help="write the results here")
  add_debug_flag(parser)
  args = parser.parse_args(argv)
  for name in ("prompts", "new_tokens", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.group_size < 2 or args.slots < 0 or not args.temperature > 0:
    parser.error("--group-size must be >= 2, --slots >= 0 and --temperature > 0")
  args.dtype = default_dtype() if args.dtype == "auto" else args.dtype
  return run_cli(lambda: run(args), debug=args.debug)
