"""`python -m flashvl_jax.train [CONFIG] [key=value ...] [--resume] [--compile-only --topology v5e:2x4]`

CONFIG is a name in configs/train/ (default: `demo`, the embedded synthetic demo) or a YAML path. Multi-host:
pass `--coordinator-address host:port --num-processes N --process-id I` (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; or `distributed.auto=true` on TPU pods and SLURM).
"""

from __future__ import annotations

import argparse
import os
import sys

from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli
from flashvl_jax.config import preset_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = ArgumentParser(prog="python -m flashvl_jax.train", description=__doc__.split("\n\n")[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=f"configs (configs/train/): {', '.join(preset_names('train'))}")
  parser.add_argument("config", nargs="?", default="demo", help="configs/train/ name or YAML path (default: demo)")
  parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.peak_lr=1e-4")
  parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
  parser.add_argument("--compile-only", action="store_true",
                      help="ahead-of-time compile the train step for --topology and print memory and FLOPs")
  parser.add_argument("--topology", default="v5e:2x4", help="TPU topology for --compile-only (needs libtpu)")
  parser.add_argument("--compilation-cache", metavar="DIR",
                      help="persistent compilation cache: a second start skips XLA (= compilation_cache_dir=DIR)")
  parser.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  parser.add_argument("--num-processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"))
  parser.add_argument("--process-id", type=int, default=os.environ.get("JAX_PROCESS_ID"))
  add_debug_flag(parser)
  args = parser.parse_intermixed_args(argv)  # flags may sit between the config and its overrides
  if "=" in args.config:  # `python -m flashvl_jax.train steps=10`: overrides of the demo
    args.overrides.insert(0, args.config)
    args.config = "demo"
  if args.compilation_cache:
    args.overrides.append(f"compilation_cache_dir={args.compilation_cache}")
  for flag in ("coordinator_address", "num_processes", "process_id"):
    if getattr(args, flag) is not None:
      args.overrides.append(f"distributed.{flag}={getattr(args, flag)}")
  return args


def run(args: argparse.Namespace) -> int:
  from flashvl_jax.train.config import load_train_config

  cfg = load_train_config(args.config, args.overrides)
  if args.compile_only:
    from flashvl_jax.compilation_cache import enable_compilation_cache
    from flashvl_jax.train.compile import compile_for_topology
    enable_compilation_cache(cfg.compilation_cache_dir)
    compile_for_topology(cfg, args.topology)
    return 0
  from flashvl_jax.train.trainer import NonFiniteLossError, train
  try:
    train(cfg, resume=args.resume)
  except NonFiniteLossError as e:  # the run diverged: not a usage error, but no traceback helps either
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
