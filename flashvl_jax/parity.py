"""`python -m flashvl_jax.parity`: our modules against the PyTorch (transformers) reference, as a table.

Builds tiny random Hugging Face checkpoints (every parameter re-randomised), loads them with
`flashvl_jax.weights.auto.from_hf`, runs both sides on the same inputs and prints, per component, the max abs
difference, the relative error (max abs diff / max |reference|), the tolerance and pass/fail. Exits 1 if
any row fails. Needs the `test` extra (torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
from typing import Callable

import jax.numpy as jnp
import numpy as np

from flashvl_jax.cli import ArgumentParser, run_cli
from flashvl_jax.errors import MissingDependencyError
from flashvl_jax.weights.auto import from_hf

FP32_TOL = 1e-4


@dataclasses.dataclass
class Row:
  component: str
  max_abs: float
  rel: float
  tolerance: str
  passed: bool


def _compare(name: str, got, expected, tol: float = FP32_TOL) -> Row:
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  err = float(np.abs(got - expected).max())
  rel = err / float(np.abs(expected).max())
  return Row(name, err, rel, f"max abs <= {tol:g}", err <= tol)


def _torch_nchw(pixels_nhwc: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels_nhwc, -1, -3)))


def vision_rows(root: pathlib.Path) -> list[Row]:
  from flashvl_jax.testing.tiny_vision import (build_tiny_aimv2, build_tiny_siglip, random_pixels, reference_outputs,
                                               write_apple_layout)

  rows = []
  siglip_ref = build_tiny_siglip(root / "siglip", seed=1)
  siglip = from_hf(root / "siglip")
  pixels = random_pixels(0, 32, 32)
  rows.append(_compare("SigLIP last_hidden_state", siglip(jnp.asarray(pixels)),
                       reference_outputs(siglip_ref, pixels)["post_norm"]))
  wide = random_pixels(1, 48, 40)
  rows.append(_compare("SigLIP bicubic positions (48x40 input)",
                       siglip(jnp.asarray(wide), interpolate_pos_encoding=True),
                       reference_outputs(siglip_ref, wide, interpolate_pos_encoding=True)["post_norm"]))
  aimv2_ref = build_tiny_aimv2(root / "aimv2", seed=2)
  write_apple_layout(aimv2_ref, root / "aimv2_apple")
  pixels = random_pixels(2, 28, 28)
  expected = reference_outputs(aimv2_ref, pixels)["post_norm"]
  rows.append(_compare("AIMv2 last_hidden_state", from_hf(root / "aimv2")(jnp.asarray(pixels)), expected))
  rows.append(_compare("AIMv2 (Apple layout) last_hidden_state", from_hf(root / "aimv2_apple")(jnp.asarray(pixels)),
                       expected))
  return rows


def qwen2_rows(root: pathlib.Path) -> list[Row]:
  import torch

  from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2

  ref = build_tiny_qwen2(root / "qwen2", seed=3)
  ours = from_hf(root / "qwen2")
  rng = np.random.default_rng(3)
  vocab = ref.config.vocab_size
  ids = rng.integers(0, vocab, (2, 12))

  def torch_logits(**kw):
    with torch.no_grad():
      return ref(**{k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in kw.items()}).logits.numpy()

  rows = [_compare("Qwen2 logits", ours(jnp.asarray(ids)), torch_logits(input_ids=ids))]
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)))
  expected = torch_logits(input_ids=ids, attention_mask=mask, position_ids=pos)
  valid = mask.astype(bool)
  rows.append(_compare("Qwen2 logits, left padding", got[valid], expected[valid]))
  far = pos + 30_000
  rows.append(_compare("Qwen2 logits, positions ~30,000",
                       ours(jnp.asarray(ids), position_ids=jnp.asarray(far)), torch_logits(input_ids=ids,
                                                                                          position_ids=far)))
  return rows


def flashvl_rows(root: pathlib.Path) -> list[Row]:
  import torch

  from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2
  from flashvl_jax.testing.tiny_vision import build_tiny_aimv2, build_tiny_siglip, random_pixels
  from flashvl_jax.testing.torch_flashvl import build_tiny_flashvl, save_released_layout

  rng = np.random.default_rng(4)

  def prompt(n_image_tokens, vocab, batch=2, before=6, after=9):
    image = [-200] + [-201] * (n_image_tokens - 1)
    return np.asarray([list(rng.integers(0, vocab, before)) + image + list(rng.integers(0, vocab, after))
                       for _ in range(batch)], np.int32)

  def torch_logits(ref, ids, pixels):
    with torch.no_grad():
      return ref(torch.from_numpy(ids.astype(np.int64)), _torch_nchw(pixels)).numpy()

  rows = []
  static = build_tiny_flashvl(build_tiny_siglip(root / "fv_siglip", seed=5), build_tiny_qwen2(root / "fv_q1", seed=6),
                              seed=7)
  save_released_layout(static, root / "flashvl_static", image_token_num=4)
  ids, pixels = prompt(4, 160), random_pixels(5, 32, 32)
  expected = torch_logits(static, ids, pixels)
  rows.append(_compare("Flash-VL static (SigLIP) logits", from_hf(root / "flashvl_static")(jnp.asarray(ids),
                                                                                         jnp.asarray(pixels)), expected))
  bf16 = np.asarray(from_hf(root / "flashvl_static", dtype="bfloat16")(jnp.asarray(ids), jnp.asarray(pixels)),
                    np.float32)
  agree = float((bf16.argmax(-1) == expected.argmax(-1)).mean())
  err = float(np.abs(bf16 - expected).max())
  rows.append(Row("Flash-VL static bf16 logits (top-1 agreement)", err, err / float(np.abs(expected).max()),
                  f"top-1 >= 99% (got {agree:.1%})", agree >= 0.99))

  tiles = build_tiny_flashvl(build_tiny_aimv2(root / "fv_aimv2", seed=8),
                             build_tiny_qwen2(root / "fv_q2", seed=9, tied=False), seed=10)
  save_released_layout(tiles, root / "flashvl_tiles", image_token_num=8)
  ids, pixels = prompt(8, 160), random_pixels(6, 28, 28, batch=4).reshape(2, 2, 28, 28, 3)
  rows.append(_compare("Flash-VL 2-tile (AIMv2) logits",
                       from_hf(root / "flashvl_tiles")(jnp.asarray(ids), jnp.asarray(pixels)),
                       torch_logits(tiles, ids, pixels)))
  return rows


SECTIONS: tuple[Callable[[pathlib.Path], list[Row]], ...] = (vision_rows, qwen2_rows, flashvl_rows)


def format_table(rows: list[Row]) -> str:
  width = max(len(r.component) for r in rows)
  lines = [f"{'component':<{width}}  {'max abs diff':>12}  {'rel error':>9}  {'tolerance':<26}  result",
           "-" * (width + 64)]
  for r in rows:
    lines.append(f"{r.component:<{width}}  {r.max_abs:>12.2e}  {r.rel:>9.1e}  {r.tolerance:<26}  "
                 f"{'PASS' if r.passed else 'FAIL'}")
  return "\n".join(lines)


def run(out_dir: pathlib.Path) -> list[Row]:
  rows = []
  for section in SECTIONS:
    rows.extend(section(out_dir))
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m flashvl_jax.parity", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="where to write the tiny checkpoints (default: a temporary directory)")
  args = parser.parse_args(argv)
  return run_cli(lambda: check(args))


def check(args: argparse.Namespace) -> int:
  try:
    import torch  # noqa: F401
  except ImportError:
    raise MissingDependencyError("python -m flashvl_jax.parity needs PyTorch and transformers: pip install -e '.[reference]' "
                                 "(docs/install.md: the CPU build of torch)") from None
  if args.out is None:
    with tempfile.TemporaryDirectory() as tmp:
      rows = run(pathlib.Path(tmp))
  else:
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.out)
  print(format_table(rows))
  failed = [r.component for r in rows if not r.passed]
  print(f"\nparity: {len(rows) - len(failed)} of {len(rows)} components within tolerance"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
