"""`--compile-only`: the tiny config's train step and sampler compile for a TPU v5e 2x2 slice on this CPU host
(libtpu from the `test` extra compiles for TPU targets without a TPU)."""

import os
import subprocess
import sys

import jax

from flashvl_jax.sharding import make_mesh
from flashvl_jax.train.compile import compile_for_topology, compile_rollouts, topology_devices
from flashvl_jax.train.config import load_train_config


def test_tiny_train_step_and_sampler_compile_for_v5e_2x2(capsys):
  cfg = load_train_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "global_batch_size=8", "grad_accum_steps=2"])
  report = compile_for_topology(cfg, "v5e:2x2")
  printed = capsys.readouterr().out
  assert "TPU v5 lite, 4 chips" in printed and "'data': 2, 'fsdp': 2" in printed
  assert set(report) == {"train_step", "prefill", "decode"}
  for name, r in report.items():
    assert 0 < r["arguments_gib"] and 0 < r["peak_gib"] < 1, (name, r)
  train = report["train_step"]
  assert train["aliased_gib"] > 0  # the donated state is updated in place
  # XLA's count and the analytic one agree within a factor of two (XLA misses nothing big; padding rows count
  # fully in the analytic FLOPs, and XLA counts the optimizer's elementwise work)
  assert 0.5 < train["xla_tflops_per_device"] / train["model_tflops_per_device"] < 2


def test_grpo_compiles_its_rollout_engine(capsys):
  """GRPO reports the engine its rollouts run on: admission of one prompt and a decode call of every slot, with
  the policy whole on each device (fsdp gathered) and the slots split over the devices."""
  cfg = load_train_config("tiny", ["objective=grpo", "lora.rank=4", r"optimizer.trainable=['\.lora_(a|b)$']",
                                   "mesh.fsdp=4", "global_batch_size=4", "grpo.group_size=2", "grpo.max_new_tokens=8"])
  _, decode = compile_rollouts(cfg, make_mesh({"fsdp": 4}, devices=topology_devices("v5e:2x2")))
  policy, slots = decode.input_shardings[0][:2]
  assert all(not {"data", "fsdp"} & set(jax.tree.leaves(tuple(s.spec))) for s in jax.tree.leaves(policy))
  assert slots.cache["k"].spec[1] == "fsdp"  # 8 slots, 2 per chip
  report = compile_for_topology(cfg, "v5e:2x2")
  assert set(report) == {"train_step", "rollout_admit", "rollout_decode"}
  assert "rollout_decode: arguments" in capsys.readouterr().out
  for name in ("rollout_admit", "rollout_decode"):
    assert 0 < report[name]["arguments_gib"] and report[name]["aliased_gib"] > 0  # the slots are donated


def compile_only_cli(topology: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "flashvl_jax.train", "tiny", "--compile-only", "--topology", topology],
                        capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_compile_only_cli_rejects_an_unknown_topology():
  # libtpu is loaded in this process (below, and by the test above); the flag lets the child load it too
  topology_devices("v5e:2x2")
  run = compile_only_cli("v9z:1x1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  assert run.returncode == 2
  assert "cannot build TPU topology 'v9z:1x1'" in run.stderr and "GENERATION:SHAPE" in run.stderr
  assert "lockfile" not in run.stderr


def test_compile_only_cli_says_when_libtpu_is_busy():
  topology_devices("v5e:2x2")  # this process holds libtpu's host lock
  run = compile_only_cli("v5e:2x2")
  assert run.returncode == 2
  assert "libtpu is in use by another process" in run.stderr and "ALLOW_MULTIPLE_LIBTPU_LOAD=1" in run.stderr


def test_flags_may_sit_between_the_config_and_its_overrides():
  from flashvl_jax.train.__main__ import parse_args
  args = parse_args(["stage2_full", "--compile-only", "--topology", "v5e:2x4", "data.path=x.jsonl", "steps=3"])
  assert (args.config, args.compile_only, args.topology) == ("stage2_full", True, "v5e:2x4")
  assert args.overrides == ["data.path=x.jsonl", "steps=3"]
  args = parse_args(["steps=3", "--resume", "--process-id", "1", "data.path=y.jsonl"])
  assert args.config == "demo" and args.resume
  assert args.overrides == ["steps=3", "data.path=y.jsonl", "distributed.process_id=1"]
