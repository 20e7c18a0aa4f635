"""DPO and GRPO through the trainer (`train(cfg)`, what `python -m flashvl_jax.train stage5_dpo|grpo` runs), on the
tiny config with LoRA: evaluation, the merged model checkpoint; GRPO's exact resume after SIGKILL, two processes
against one, and a dead process."""

import jax
import numpy as np
import pytest
from flax import nnx

from flashvl_jax import checkpoint
from flashvl_jax.testing.train_processes import (kill_one_and_wait, kill_while_checkpointing, launch_two_processes,
                                                 records, wait_all)
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.state import Checkpointer
from flashvl_jax.train.trainer import train

LORA = ["lora.rank=4", r"optimizer.trainable=['\.lora_(a|b)$']", "optimizer.schedule=constant",
        "optimizer.warmup_steps=0", "optimizer.peak_lr=1e-2", "data.shuffle=false"]


def test_dpo_run_reports_preferences_and_saves_a_merged_model(tmp_path):
  cfg = load_train_config("tiny", ["objective=dpo", "steps=3", "data.eval_size=8", f"output_dir={tmp_path}", *LORA])
  result = train(cfg)
  assert {"loss", "reward_margin", "reward_accuracy", "pairs"} <= set(result["eval"])
  assert result["eval"]["pairs"] == 8
  assert {"reward_margin", "reward_accuracy", "pairs"} <= set(result["train"])
  module, _ = checkpoint.load_model(tmp_path / "model", dtype="float32")
  assert not nnx.state(module, nnx.LoRAParam)  # adapters merged: the base layout, ready for `convert export`
  saved = jax.tree.leaves(nnx.state(module, nnx.Param))
  merged = jax.tree.leaves(nnx.state(result["model"].module, nnx.Param))
  assert all(np.array_equal(a, b) for a, b in zip(saved, merged, strict=True))


GRPO = ["objective=grpo", "steps=3", "grpo.group_size=4", "grpo.max_new_tokens=4", "global_batch_size=4",
        "checkpoint.every_steps=1", "checkpoint.keep=5", "eval.accuracy=false",
        "grpo.rewards=[flashvl_jax.testing.rewards:character_variety]", "grpo.kl_coef=0.1", *LORA]


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
  """(result, metrics records) of an uninterrupted one-process GRPO run on 8 devices."""
  output_dir = tmp_path_factory.mktemp("grpo")
  result = train(load_train_config("tiny", [f"output_dir={output_dir}", *GRPO]))
  return result, records(output_dir)


def test_grpo_sigkilled_run_resumes_with_identical_metrics(tmp_path, grpo_reference):
  """Rollouts are seeded by (seed, step, rollout) and the data iterator is in the checkpoint, so a run killed
  while writing checkpoint 2 and resumed from checkpoint 1 redoes steps 2 and 3 exactly."""
  result, reference = grpo_reference
  assert {"reward", "kl", "groups_with_signal", "completion_length"} <= set(result["train"])
  assert [r["step"] for r in reference] == [1, 2, 3]
  interrupted = kill_while_checkpointing(tmp_path, *GRPO, min_step=2)
  latest = Checkpointer(tmp_path / "checkpoints", load_train_config("tiny").checkpoint).latest_step()
  assert latest is not None and latest < interrupted
  train(load_train_config("tiny", [f"output_dir={tmp_path}", *GRPO]), resume=True)
  assert records(tmp_path) == reference


def test_grpo_two_processes_match_one_process(tmp_path, grpo_reference):
  """Each process rolls out its own prompts on its own 4 devices; the rollouts, rewards and losses are those of
  one process on 8."""
  _, reference = grpo_reference
  wait_all(launch_two_processes(tmp_path, *GRPO))
  two = records(tmp_path)
  assert [r["step"] for r in two] == [1, 2, 3]
  for key in ("train/reward", "train/reward_std", "train/completion_length", "train/kl", "train/grad_norm",
              "train/target_tokens", "train/tokens"):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in reference], rtol=1e-5, err_msg=key)
  # The advantages of a group sum to 0, so with equal completion lengths the policy term of the loss is rounding
  # (~1e-7) and the loss is mostly kl_coef * kl (~1e-4).
  np.testing.assert_allclose([r["train/loss"] for r in two], [r["train/loss"] for r in reference], rtol=1e-2,
                             atol=1e-6)


def test_grpo_dead_process_stops_the_other(tmp_path):
  procs = launch_two_processes(tmp_path, *GRPO, "distributed.heartbeat_timeout_s=5", "steps=1000")
  waited, stderr = kill_one_and_wait(procs, tmp_path / "config.yaml")
  assert procs[0].returncode != 0
  assert "another task died" in stderr and "heartbeat" in stderr, stderr[-3000:]
  assert waited < 60, f"process 0 took {waited:.0f}s to notice"
