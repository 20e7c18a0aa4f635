"""Training runs in subprocesses for tests: one or two processes (`jax.distributed` on localhost), SIGKILL while a
checkpoint is half-written, and the metrics they log without wall-clock timings."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

TIMINGS = ("train/step_seconds", "train/tokens_per_s", "train/tflops_per_device", "train/mfu")


def records(output_dir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without the wall-clock timings."""
  lines = (output_dir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def launch(output_dir: pathlib.Path, *args: str, devices: int = 8) -> subprocess.Popen:
  """`python -m flashvl_jax.train tiny output_dir=... ARGS` in a subprocess on `devices` CPU devices, with the
  matmul precision the test suite uses; stderr is piped."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  cmd = [sys.executable, "-m", "flashvl_jax.train", "tiny", f"output_dir={output_dir}", *args]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_two_processes(output_dir: pathlib.Path, *args: str) -> list[subprocess.Popen]:
  """Two processes of 4 CPU devices each, one global mesh of 8."""
  port = free_port()
  return [launch(output_dir, *args, "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                 "--process-id", str(i), devices=4) for i in range(2)]


def wait_all(procs: list[subprocess.Popen], timeout_s: float = 600) -> None:
  """Waits for every process; raises `AssertionError` with the stderr tail of one that failed."""
  for proc in procs:
    _, stderr = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, stderr[-3000:]


def kill_while_checkpointing(output_dir: pathlib.Path, *args: str, min_step: int = 3, timeout_s: float = 300) -> int:
  """Runs training (one process) and SIGKILLs it while checkpoint `>= min_step` is half-written; returns that step.

  The process is stopped (SIGSTOP) when a temporary checkpoint folder appears, and killed if the folder is still
  there (else it continues to the next one). The run must save a checkpoint every step.
  """
  proc = launch(output_dir, *args)
  partial = lambda: [p for p in (output_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*")
                     if int(p.name.split(".")[0]) >= min_step]
  deadline = time.monotonic() + timeout_s
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      if partial():
        proc.send_signal(signal.SIGSTOP)
        if partial():
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          return int(partial()[0].name.split(".")[0])
        proc.send_signal(signal.SIGCONT)  # it completed in between: wait for the next one
      time.sleep(0.002)
    raise AssertionError(f"the run ended (exit {proc.poll()}) or timed out before checkpoint {min_step} was "
                         f"written: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")
  finally:
    if proc.poll() is None:
      proc.kill()


def kill_one_and_wait(procs: list[subprocess.Popen], started: pathlib.Path, timeout_s: float = 300) -> tuple[float, str]:
  """Once `started` exists, SIGKILLs process 1 and waits for process 0 to end; returns (seconds it took after the
  kill, its stderr)."""
  try:
    deadline = time.monotonic() + timeout_s
    while not started.exists():
      assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-3000:]
      time.sleep(0.1)
    procs[1].kill()
    killed_at = time.monotonic()
    _, stderr = procs[0].communicate(timeout=120)
    return time.monotonic() - killed_at, stderr
  finally:
    for proc in procs:
      proc.kill()
