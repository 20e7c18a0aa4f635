"""Batch-1 matrix-vector products over L weight matrices: separate arrays vs one stacked [L, K, N] array read in a
loop, in JAX (and PyTorch when installed). On XLA:CPU the stacked layout copies each layer's slice before its dot,
which is the CPU decode gap in docs/benchmarks.md ("CPU, full size").

  python scripts/stacked_matvec.py                 # 8 x [1536, 8960] fp32, as one Qwen2-1.5B MLP projection
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeats: int) -> float:
  """Median seconds of `fn()` after one untimed call."""
  fn()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--rows", type=int, default=1536, help="K, the input width")
  parser.add_argument("--cols", type=int, default=8960, help="N, the output width")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(args.layers, args.rows, args.cols)).astype(np.float32)
  x = jnp.asarray(rng.normal(size=(1, args.rows)).astype(np.float32))
  stacked = jnp.asarray(weights)
  separate = [jnp.asarray(w) for w in weights]

  def loop(x, stacked):
    body = lambda i, acc: acc + x @ jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False)
    return jax.lax.fori_loop(0, args.layers, body, jnp.zeros((1, args.cols)))

  cases = {"jax, separate arrays": (jax.jit(lambda x, ws: sum(x @ w for w in ws)), separate),
           "jax, one stacked array in fori_loop": (jax.jit(loop), stacked)}
  results = {name: timed(lambda: fn(x, w).block_until_ready(), args.repeats) for name, (fn, w) in cases.items()}
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    tensors, xt = [torch.from_numpy(w.copy()) for w in weights], torch.from_numpy(np.asarray(x))
    with torch.no_grad():
      results["pytorch, separate tensors"] = timed(lambda: sum(xt @ w for w in tensors), args.repeats)
  for name, seconds in results.items():
    print(f"{name:40s} {seconds * 1e3:8.2f} ms  {weights.nbytes / seconds / 1e9:6.1f} GB/s")
  return results


if __name__ == "__main__":
  main()
