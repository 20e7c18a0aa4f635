"""Whole training runs of the tiny config: exact resume after SIGKILL, two processes vs one, a dead process,
and the NaN stop. One uninterrupted single-process run is the reference for the first two."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from flashvl_jax.testing.train_processes import (kill_one_and_wait, kill_while_checkpointing, launch_two_processes,
                                                 records, wait_all)
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.state import Checkpointer
from flashvl_jax.train.trainer import NonFiniteLossError, train

STEPS = 6
OVERRIDES = [f"steps={STEPS}", "data.shuffle=false", "data.eval_size=16", "checkpoint.every_steps=1000"]
SAVE_EVERY_STEP = ["checkpoint.every_steps=1", "checkpoint.keep=10"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Metrics records of an uninterrupted one-process run on 8 devices."""
  output_dir = tmp_path_factory.mktemp("reference")
  result = train(load_train_config("tiny", [f"output_dir={output_dir}", *OVERRIDES]))
  assert result["step"] == STEPS
  return records(output_dir)


def test_sigkilled_run_resumes_with_identical_losses(tmp_path, reference):
  interrupted = kill_while_checkpointing(tmp_path, *OVERRIDES, *SAVE_EVERY_STEP)
  latest = Checkpointer(tmp_path / "checkpoints", load_train_config("tiny").checkpoint).latest_step()
  assert latest is not None and latest < interrupted  # the half-written checkpoint is never picked up
  resumed = train(load_train_config("tiny", [f"output_dir={tmp_path}", *OVERRIDES, *SAVE_EVERY_STEP]), resume=True)
  assert resumed["step"] == STEPS
  assert records(tmp_path) == reference  # every step's loss, bitwise, and the final eval; one record each


def test_two_processes_match_one_process(tmp_path, reference):
  """Two processes of 4 devices, each feeding half of every global batch, give the one-process losses."""
  wait_all(launch_two_processes(tmp_path, *OVERRIDES))
  two = records(tmp_path)
  assert [r["step"] for r in two] == [r["step"] for r in reference]  # process 0 alone writes
  for key in ("train/loss", "train/grad_norm", "train/tokens", "eval/loss"):
    got, want = [r[key] for r in two if key in r], [r[key] for r in reference if key in r]
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)


def test_dead_process_stops_the_others_with_a_clear_error(tmp_path):
  """Process 1 is SIGKILLed once the run is set up; process 0 aborts within the heartbeat timeout, saying why."""
  procs = launch_two_processes(tmp_path, *OVERRIDES, "distributed.heartbeat_timeout_s=5", "steps=1000")
  waited, stderr = kill_one_and_wait(procs, tmp_path / "config.yaml")  # written right before the first step
  assert procs[0].returncode != 0
  assert "another task died" in stderr and "heartbeat" in stderr, stderr[-3000:]
  assert waited < 60, f"process 0 took {waited:.0f}s to notice"


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = load_train_config("tiny", [f"output_dir={tmp_path}", "optimizer.peak_lr=.inf", "optimizer.warmup_steps=0",
                                   "checkpoint.every_steps=1", "data.eval_size=0"])
  with pytest.raises(NonFiniteLossError, match=r"at step 2; stopped without saving it.*last good checkpoint is "
                     r"step 1"):
    train(cfg)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if re.fullmatch(r"\d+", p.name)) == [1]


def test_demo_command_trains_reports_accuracy_and_answers(tmp_path):
  """The README's first command (`python -m flashvl_jax.train`, no config: the demo), cut to a few steps: it trains,
  prints `eval accuracy: 0.NN` and answers questions; a second run in the same folder starts over."""
  cmd = [sys.executable, "-m", "flashvl_jax.train", "steps=3", "eval.every_steps=0", "data.eval_size=16",
         "demo_questions=2", f"output_dir={tmp_path}"]
  for _ in range(2):
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"^eval accuracy: [01]\.\d\d$", run.stdout, re.M), run.stdout
    assert len(re.findall(r"^Q: .+  A: .*  \(expected: .+\)$", run.stdout, re.M)) == 2, run.stdout
    assert records(tmp_path)[-1]["step"] == 3
