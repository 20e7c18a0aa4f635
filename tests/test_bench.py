"""Smoke test of `python -m flashvl_jax.bench` at tiny size (no timing assertions): every measurement is
produced, and in fp32 our greedy tokens equal transformers' on the same random weights for all new tokens."""

import json

import pytest

from flashvl_jax import bench
from flashvl_jax.config import load_config
from flashvl_jax.train.flops import vit_flops_per_tile


def test_bench_tiny_static(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench.main(["--size", "tiny", "--variants", "static", "--new-tokens", "12", "--repeats", "1",
                     "--batch-sizes", "1,2", "--vision-batch", "2", "--dtype", "float32", "--device-peak-tflops",
                     "1", "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert report["environment"]["jax"] and report["settings"]["variants"] == ["static"]
  (result,) = report["results"]
  assert result["preset"] == "tiny-static" and result["image_tokens"] == 16
  assert result["vision_flops_per_image"] == vit_flops_per_tile(load_config("tiny-static"))
  assert 150 <= result["prompt_tokens"] - result["image_tokens"] <= 200  # the MMMU-length question
  for side in ("jax", "torch"):
    r = result[side]
    assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["tokens_per_s"] > 0 and r["vision_images_per_s"] > 0
    assert set(r["decode_tokens_per_s"]) == {"1", "2"} and min(r["decode_tokens_per_s"].values()) > 0
    assert len(r["tokens"]) == 12
    # MFU against the 1 TFLOP/s passed in: images/s times the analytic FLOPs of one tile
    assert r["vision_mfu"] * 1e12 == pytest.approx(r["vision_images_per_s"] * result["vision_flops_per_image"])
  assert result["jax"]["compiled"] == {"prefill": 1, "decode": 1}
  assert result["same_greedy_prefix"] == 12
  assert set(result["speedup"]) == {"ttft", "tpot", "tokens_per_s", "vision", "decode_b1", "decode_b2"}
  printed = capsys.readouterr().out
  assert "JAX / PyTorch: ttft" in printed and "greedy tokens identical for the first 12 of 12" in printed


def test_rollout_bench_runs_both_paths(tmp_path, capsys):
  """`python -m flashvl_jax.bench --rollouts` at tiny size: the same completions counted both ways (a random model
  rarely stops, so both make every token), and the ratio printed."""
  out = tmp_path / "rollouts.json"
  assert bench.main(["--rollouts", "--prompts", "2", "--group-size", "3", "--new-tokens", "5", "--slots", "4",
                     "--repeats", "1", "--dtype", "float32", "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert len(report["completion_lengths"]) == 6 and max(report["completion_lengths"]) <= 5
  for side in ("static", "engine"):
    assert 0 < report[side]["tokens"] <= 30 and report[side]["tokens_per_s"] > 0
  assert report["ratio"] == pytest.approx(report["engine"]["tokens_per_s"] / report["static"]["tokens_per_s"])
  printed = capsys.readouterr().out
  assert "2 prompts x 3 = 6 completions" in printed and "x static" in printed
