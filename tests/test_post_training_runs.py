"""DPO and GRPO through the trainer (`train(cfg)`, what `python -m flashvl_jax.train stage5_dpo|grpo` runs), on the
tiny config with LoRA: evaluation, the merged model checkpoint, and exact resume."""

import json
import shutil

import jax
import numpy as np
from flax import nnx

from flashvl_jax import checkpoint
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.trainer import train

LORA = ["lora.rank=4", r"optimizer.trainable=['\.lora_(a|b)$']", "optimizer.schedule=constant",
        "optimizer.warmup_steps=0", "optimizer.peak_lr=1e-2", "data.shuffle=false"]


def records(output_dir):
  timings = ("train/step_seconds", "train/tokens_per_s", "train/tflops_per_device", "train/mfu")
  return [{k: v for k, v in json.loads(line).items() if k not in timings}
          for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


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


def test_grpo_run_resumes_with_identical_metrics(tmp_path):
  """Rollouts are seeded by the step, so a run resumed from checkpoint 2 redoes step 3 exactly."""
  cfg = load_train_config("tiny", ["objective=grpo", "steps=3", "grpo.group_size=4", "grpo.max_new_tokens=4",
                                   "global_batch_size=2", "checkpoint.every_steps=1", "checkpoint.keep=5",
                                   "eval.accuracy=false", f"output_dir={tmp_path}", *LORA])
  result = train(cfg)
  assert {"reward", "kl", "groups_with_signal", "completion_length"} <= set(result["train"])
  first = records(tmp_path)
  assert [r["step"] for r in first] == [1, 2, 3]
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  train(cfg, resume=True)
  assert records(tmp_path) == first
