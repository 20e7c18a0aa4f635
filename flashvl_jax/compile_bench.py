"""`python -m flashvl_jax.bench --compile`: how long the full-size model takes to lower and compile, and how much
host memory that takes, at 2 layers per tower and at full depth.

For each preset (static, iss) and depth, two fresh processes (so each peak RSS is its own) build the model from
shapes alone (`nnx.eval_shape`, no weights) and time `lower` and `compile` of
- the sampler's prefill and decode (bf16, batch 1, a 512-token prompt bucket, 64 decode slots), on this host;
- the stage-2 train step (`stage2_full`: everything trains, `remat: full`, global batch 240 in 30 micro-batches of
  2,048 tokens), on this host or, with `--topology v5e:2x4`, for that TPU slice through libtpu.
The decode row also counts instructions in the compiled decode that copy a whole stacked weight (should be 0), and
those that write one layer's weight matrix (each runs every step: on XLA:CPU every projection's slice of its
stack is materialised before its dot, which is why batch-1 decode trails PyTorch there; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

from flashvl_jax.cli import USAGE_ERROR, ArgumentParser, run_cli
from flashvl_jax.config import ConfigError
from flashvl_jax.host_memory import peak_rss_gb

PRESETS = {"full": {"static": "flashvl-2b-static", "iss": "flashvl-2b-dynamic-iss"},
           "tiny": {"static": "tiny-static", "iss": "tiny-iss"}}
PASS_THROUGH = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "opt-barrier", "conditional", "call"}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])(?:\{[^}]*\})? ([\w-]+)\(")


def stacked_weight_copies(hlo_text: str, shapes: Sequence[str]) -> list[str]:
  """Instructions of a compiled module that produce a value shaped like a stacked weight (`shapes`, HLO spelling
  such as 'bf16[28,1536,8960]') other than by passing it through: each would copy a whole stack. Meaningful for
  stacks of 2 or more layers: XLA removes a one-step loop, and a [1, ...] "stack" is then just that layer."""
  wanted = set(shapes)
  found = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group(1) in wanted and m.group(2) not in PASS_THROUGH:
      found.append(line.strip()[:160])
  return found


def hlo_shape(shape: Sequence[int], dtype: Any) -> str:
  import numpy as np
  names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
  return f"{names[np.dtype(dtype).name]}[{','.join(map(str, shape))}]"


def _train_config(preset: str, layers: int | None, *, sampler: bool):
  from flashvl_jax.train.config import load_train_config
  overrides = ["data.path=unused.jsonl", f"model.preset={preset}"]
  if layers:
    overrides.append(f"model.overrides=[vision.num_hidden_layers={layers},llm.num_hidden_layers={layers}]")
  if sampler:
    overrides += ["global_batch_size=1", "data.max_length=512", "eval.max_new_tokens=64"]
  else:
    overrides.append("grad_accum_steps=30")
  return load_train_config("stage2_full", overrides)


def measure(part: str, preset: str, layers: int | None, topology: str | None) -> dict[str, Any]:
  """One measurement in this process: {'timings': seconds by phase, 'peak_rss_gb', ...}."""
  import jax
  from flax import nnx

  from flashvl_jax.config import load_config
  from flashvl_jax.models.flashvl import FlashVLModel
  from flashvl_jax.sharding import make_mesh
  from flashvl_jax.train import compile as aot

  timings: dict[str, float] = {}
  result: dict[str, Any] = {"part": part, "preset": preset, "layers": layers or "full"}
  if part == "sampler":
    cfg = _train_config(preset, layers, sampler=True)
    _, decode = aot.compile_sampler(cfg, make_mesh({"fsdp": 1}, devices=jax.devices()[:1]), timings)
    model_cfg = load_config(cfg.model.flashvl_config(), [f"param_dtype={cfg.model.compute_dtype}"])
    abstract = nnx.eval_shape(lambda: FlashVLModel(model_cfg, rngs=nnx.Rngs(0)))
    stacked = [v for _, v in nnx.to_flat_state(nnx.state(abstract.llm.model.layers, nnx.Param))]
    shapes = {hlo_shape(v.shape, v.dtype) for v in stacked}
    # one layer's matrix, in any floating dtype it may be converted to on the way to its dot
    layer_shapes = {hlo_shape(v.shape[1:], dtype) for v in stacked if len(v.shape) > 2
                    for dtype in ("float32", "bfloat16")}
    result["decode_stacked_weight_copies"] = len(stacked_weight_copies(decode.as_text(), sorted(shapes)))
    result["decode_layer_weight_copies"] = len(stacked_weight_copies(decode.as_text(), sorted(layer_shapes)))
    result["decode_temporaries_mb"] = decode.memory_analysis().temp_size_in_bytes / 1e6
  else:
    cfg = _train_config(preset, layers, sampler=False)
    devices = aot.topology_devices(topology) if topology else jax.devices()[:1]
    compiled, _, _ = aot.compile_train_step(cfg, make_mesh({"fsdp": -1}, devices=devices), timings)
    result["train_step_peak_gib_per_device"] = aot.memory_report(compiled)["peak_gib"]
    result["target"] = topology or "host"
  result["timings"] = timings
  result["peak_rss_gb"] = peak_rss_gb()
  return result


def run_child(part: str, preset: str, layers: int | None, topology: str | None, env: dict[str, str]) -> dict:
  command = [sys.executable, "-m", "flashvl_jax.compile_bench", "--one", part, "--preset", preset]
  command += ["--layers", str(layers)] if layers else []
  command += ["--topology", topology] if topology and part == "train" else []
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, env=env)
  if done.returncode == USAGE_ERROR:  # the child reported a problem the user can fix (e.g. no libtpu)
    raise ConfigError(done.stderr.strip().splitlines()[-1].removeprefix("error: "))
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["process_seconds"] = time.perf_counter() - start
  return result


def format_row(r: dict[str, Any]) -> str:
  t = r["timings"]
  if r["part"] == "sampler":
    what = (f"prefill lower {t['prefill_lower']:6.1f} s compile {t['prefill_compile']:6.1f} s | decode lower "
            f"{t['decode_lower']:6.1f} s compile {t['decode_compile']:6.1f} s | stacked-weight copies in decode: "
            f"{r['decode_stacked_weight_copies']}, per-layer weight copies: {r['decode_layer_weight_copies']}")
  else:
    what = (f"train step ({r['target']}) lower {t['train_step_lower']:6.1f} s compile {t['train_step_compile']:6.1f} s"
            f" | peak {r['train_step_peak_gib_per_device']:.2f} GiB/device")
  return f"{r['preset']:7s} layers {str(r['layers']):>4s}  {what} | host RSS {r['peak_rss_gb']:.2f} GB"


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m flashvl_jax.bench --compile", description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=tuple(PRESETS), default="full", help="model presets (default full)")
  parser.add_argument("--variants", default="static,iss", help="comma-separated: static, iss")
  parser.add_argument("--depths", default="2,full", help="layers per tower to compile at: numbers and/or 'full'")
  parser.add_argument("--parts", default="sampler,train", help="sampler (prefill + decode) and/or train")
  parser.add_argument("--topology", help="compile the train step for this TPU topology (e.g. v5e:2x4; needs libtpu)")
  parser.add_argument("--compilation-cache", help="also time a second (warm) run with this persistent cache")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--one", choices=("sampler", "train"), help=argparse.SUPPRESS)
  parser.add_argument("--preset", help=argparse.SUPPRESS)
  parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:  # a child: one measurement, JSON on the last line
    from flashvl_jax.compilation_cache import enable_compilation_cache
    enable_compilation_cache()
    return run_cli(lambda: print(json.dumps(measure(args.one, args.preset, args.layers, args.topology))))
  variants = [v for v in args.variants.split(",") if v]
  unknown = set(variants) - set(PRESETS[args.size])
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(PRESETS[args.size])}")
  return run_cli(lambda: run(args, variants))


def run(args: argparse.Namespace, variants: list[str]) -> None:
  depths = [None if d == "full" else int(d) for d in args.depths.split(",") if d]
  runs = [("cold", dict(os.environ))]
  if args.compilation_cache:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.abspath(args.compilation_cache)}
    runs = [("cold", env), ("warm", env)]
  results = []
  for variant in variants:
    for part in [p for p in args.parts.split(",") if p]:
      for layers in depths:
        for label, env in runs:
          r = run_child(part, PRESETS[args.size][variant], layers, args.topology, env)
          r["run"] = label
          print(("" if len(runs) == 1 else f"[{label}] ") + format_row(r), flush=True)
          results.append(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  raise SystemExit(main())
