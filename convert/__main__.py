"""`python -m convert {hf,export,inspect,assemble} ...` (the `flashvl-convert` console script)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

import convert
from convert.verify import verify
from flashvl_jax import checkpoint
from flashvl_jax.cli import ArgumentParser, add_debug_flag, run_cli

DTYPES = ("bfloat16", "float32", "float16")
TILING_MODES = ("static", "dynamic", "overlap", "iss")


def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
  number, unit, binary = match.groups()
  base = 1024 if binary else 1000
  return int(float(number) * base**" KMGT".index(unit.upper() or " "))


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(prog="python -m convert", description=convert.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  hf = sub.add_parser("hf", help="Hugging Face safetensors -> Orbax model checkpoint")
  hf.add_argument("src", help="HF directory: model.safetensors or a sharded set with model.safetensors.index.json")
  hf.add_argument("--out", required=True, help="destination directory (written atomically)")
  hf.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the source's; float32 if mixed)")
  hf.add_argument("--preset", help="a Flash-VL's model preset (e.g. flashvl-2b-dynamic-iss): its tiling")
  hf.add_argument("--tiling", choices=TILING_MODES,
                  help="a Flash-VL's tiling mode (default: the preset's, else inferred from the checkpoint)")
  hf.add_argument("--verify", action="store_true",
                  help="run the PyTorch model and ours on a probe input and print the max abs difference")

  export = sub.add_parser("export", help="model checkpoint -> Hugging Face safetensors + config.json")
  export.add_argument("ckpt", help="a model checkpoint, or a training checkpoint step (<output_dir>/checkpoints/<step>)")
  export.add_argument("--out", required=True, help="destination directory (written atomically)")
  export.add_argument("--dtype", choices=DTYPES, help="tensor dtype (default: as stored)")
  export.add_argument("--max-shard-size", type=parse_size, default="2GB",
                      help="split into model-0000i-of-0000n.safetensors above this size; a shard is held in memory "
                      "while written (default 2GB)")

  inspect = sub.add_parser("inspect", help="describe an HF directory or a model checkpoint")
  inspect.add_argument("src")

  assemble = sub.add_parser("assemble", help="vision + LLM checkpoints + a fresh adapter -> a new Flash-VL")
  assemble.add_argument("--vision", required=True, help="HF SigLIP or AIMv2 directory (transformers or Apple layout)")
  assemble.add_argument("--llm", required=True, help="HF Qwen2ForCausalLM directory")
  assemble.add_argument("--out", required=True, help="destination directory (written atomically)")
  assemble.add_argument("--preset", help="model preset for the adapter and tiling (e.g. flashvl-2b-static)")
  assemble.add_argument("--tiling", choices=TILING_MODES, help="tiling mode (default: the preset's, or by tower)")
  assemble.add_argument("--adapter-width", type=int, help="adapter intermediate size (default: the preset's)")
  assemble.add_argument("--dtype", choices=DTYPES,
                        help="parameter dtype (default: the sources', float32 if they differ)")
  assemble.add_argument("--seed", type=int, default=0, help="adapter initialisation seed")

  random = sub.add_parser("random", help="a Flash-VL of a preset's shapes with random weights (to try the tools)")
  random.add_argument("--preset", required=True, help="a model preset (e.g. tiny-static, flashvl-2b-static)")
  random.add_argument("--out", required=True, help="destination directory (written atomically)")
  random.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default float32)")
  random.add_argument("--seed", type=int, default=0)
  random.add_argument("--hf", action="store_true", help="write the released Hugging Face layout, not Orbax")

  for command in (hf, export, assemble, random):
    command.add_argument("--overwrite", action="store_true", help="replace a complete checkpoint at the destination")
    command.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
  for command in (hf, export, inspect, assemble, random):
    add_debug_flag(command)
  return parser


def run(args: argparse.Namespace) -> int | None:
  if args.command == "hf":
    out = convert.convert_hf(args.src, args.out, dtype=args.dtype, preset=args.preset, tiling=args.tiling,
                             overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {out}")
    cfg = checkpoint.read_config(out)
    if hasattr(cfg, "tiling"):
      how = "from --preset/--tiling" if args.preset or args.tiling else "inferred; --preset or --tiling to choose"
      print(f"tiling: {cfg.tiling.mode} ({how})")
    if args.verify:
      diff, allowed = verify(args.src, out)
      verdict = "PASS" if diff <= allowed else "FAIL"
      print(f"verify: max abs difference to the PyTorch model {diff:.3e}, tolerance {allowed:.3e} "
            f"(1e-4 x the output scale): {verdict}")
      if verdict == "FAIL":
        return 1
  elif args.command == "export":
    out = convert.export_checkpoint(args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                                    overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {out}")
  elif args.command == "inspect":
    print(convert.inspect_path(args.src))
  elif args.command == "random":
    out = convert.write_random(args.preset, args.out, dtype=args.dtype, seed=args.seed, hf=args.hf,
                               overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {out} (random weights)")
  else:
    out = convert.assemble(args.vision, args.llm, args.out, preset=args.preset, tiling=args.tiling,
                           adapter_width=args.adapter_width, dtype=args.dtype, seed=args.seed,
                           overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return run_cli(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
