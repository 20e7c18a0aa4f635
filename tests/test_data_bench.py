"""`python -m flashvl_jax.data.bench` runs end to end (threads and a worker process) and prints its table."""

import os
import re
import subprocess
import sys


def test_bench_cli_prints_images_per_second_for_each_mode_and_setting():
  args = ["--preset", "tiny-iss", "--modes", "static", "iss", "--num-images", "6", "--image-size", "64",
          "--batch-size", "2", "--batches", "2", "--threads", "2", "--workers", "1", "--max-length", "96"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "flashvl_jax.data.bench", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[1].split() == ["mode", "sequential", "threads=2", "workers=1"]
  rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:]}
  assert rows.keys() == {"static", "iss"}
  assert all(len(v) == 3 and min(v) > 0 for v in rows.values()), rows
  assert re.match(r"images/s, tiny-iss tiles, 64x64 JPEG sources, batch 2", lines[0])
