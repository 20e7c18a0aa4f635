"""The compile benchmark CLI, the persistent compilation cache setting, and the prepared GPU script in tiny mode."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A second start of the same program, with the cache set by the given means, must find its executables there.
# The tiny model compiles in well under the CLIs' half-second floor on a fast machine, so the floor is 0 here.
CACHED_PROGRAM = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from flashvl_jax import sampling
from flashvl_jax.compilation_cache import enable_compilation_cache
from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel

hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
print("cache:", enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None, min_compile_seconds=0))
model = FlashVLModel(load_config("tiny-static"), rngs=nnx.Rngs(0))
sampler = sampling.Sampler(model)
params = sampling.SamplingParams()
carry = sampler.prefill(sampler.prepare(np.ones((1, 9), np.int32), max_new_tokens=4), params)
jax.block_until_ready(sampler.decode(carry, 4, params))
print("hits:", len(hits))
"""


def run_cached(args, env):
  done = subprocess.run([sys.executable, "-c", CACHED_PROGRAM, *args], capture_output=True, text=True, timeout=300,
                        env={**os.environ, **env}, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_second_start_reads_the_compilation_cache(tmp_path, how):
  cache = tmp_path / "xla-cache"
  args, env = ([str(cache)], {}) if how == "argument" else ([], {"JAX_COMPILATION_CACHE_DIR": str(cache)})
  cold = run_cached(args, env)
  assert f"cache: {cache}" in cold and "hits: 0" in cold
  assert any(cache.iterdir())  # executables were written
  warm = run_cached(args, env)
  assert "hits: 0" not in warm, warm  # prefill and decode came from the cache


def test_no_setting_leaves_the_cache_off(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  done = subprocess.run([sys.executable, "-c", CACHED_PROGRAM], capture_output=True, text=True, timeout=300, env=env,
                        cwd=ROOT)
  assert done.returncode == 0 and "cache: None" in done.stdout, done.stderr[-2000:]


def test_compile_bench_cli_on_tiny_presets(tmp_path):
  out = tmp_path / "compile.json"
  done = subprocess.run([sys.executable, "-m", "flashvl_jax.bench", "--compile", "--size", "tiny", "--variants",
                         "static", "--depths", "3,full", "--json", str(out)], capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [(r["part"], r["layers"]) for r in rows] == [("sampler", 3), ("sampler", "full"), ("train", 3),
                                                      ("train", "full")]
  for r in rows:
    assert all(seconds > 0 for seconds in r["timings"].values()) and r["peak_rss_gb"] > 0.1
  assert all(r["decode_stacked_weight_copies"] == 0 for r in rows if r["part"] == "sampler")
  # XLA:CPU copies each layer's slice of a stacked weight before its dot, every decode step (docs/benchmarks.md,
  # "CPU, full size"); when a change removes the copies, this fails: update the docs with the new decode speed
  assert all(r["decode_layer_weight_copies"] > 0 for r in rows if r["part"] == "sampler")
  assert "stacked-weight copies in decode: 0" in done.stdout and "train step (host)" in done.stdout
  bad = subprocess.run([sys.executable, "-m", "flashvl_jax.bench", "--compile", "--variants", "dynamic"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert bad.returncode == 2 and bad.stderr.startswith("error: unknown variants ['dynamic']")


@pytest.mark.slow
def test_gpu_script_runs_its_tiny_mode_on_cpu(tmp_path):
  done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--tiny"], capture_output=True, text=True,
                        timeout=900, env={**os.environ, "OUT": str(tmp_path), "XLA_FLAGS": ""}, cwd=ROOT)  # one device
  assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
  for name in ("environment.txt", "parity.txt", "bench.json", "serve.json", "train.txt"):
    assert (tmp_path / name).is_file(), name
  assert "PASS" in (tmp_path / "parity.txt").read_text()
  results = json.loads((tmp_path / "bench.json").read_text())["results"]
  assert [r["variant"] for r in results] == ["static", "iss"]
  assert "tokens/s" in (tmp_path / "train.txt").read_text()
  wrong = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--huge"], capture_output=True, text=True)
  assert wrong.returncode == 2 and wrong.stderr.startswith("error: unknown argument --huge")


def test_stacked_matvec_script_times_every_layout():
  """scripts/stacked_matvec.py (the CPU decode-gap measurement in docs/benchmarks.md) at a small size."""
  done = subprocess.run([sys.executable, "scripts/stacked_matvec.py", "--layers", "2", "--rows", "64", "--cols",
                         "128", "--repeats", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  for name in ("jax, separate arrays", "jax, one stacked array in fori_loop", "pytorch, separate tensors"):
    assert re.search(rf"^{re.escape(name)} +[\d.]+ ms +[\d.]+ GB/s$", done.stdout, re.M), done.stdout
