"""The CLI error contract (`flashvl_jax.cli`): a problem the user can fix prints one `error: ...` line naming it
and exits 2 without a traceback; `--debug` / FLASHVL_DEBUG shows the traceback. Tables of bad inputs per CLI."""

import json
import os
import subprocess
import sys

import pytest

from convert.__main__ import main as convert_main
from flashvl_jax.chat import main as chat_main
from flashvl_jax.train.__main__ import main as train_main

QUICK = ["steps=1", "data.eval_size=0", "eval.accuracy=false"]


def assert_user_error(capsys, code, *fragments):
  err = capsys.readouterr().err
  assert code == 2, err[-2000:]
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert lines and "Traceback" not in err, err[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished one-step tiny run: its output_dir (checkpoints and model/)."""
  out = tmp_path_factory.mktemp("trained")
  assert train_main(["tiny", f"output_dir={out}", *QUICK]) == 0
  return out


@pytest.fixture
def data_files(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "bad.yaml").write_text("model: [1,\n")
  good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
  long = {"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "no"}]}
  (tmp_path / "too_long.jsonl").write_text("".join(json.dumps(dict(long, id=f"l{i}")) + "\n" for i in range(20)))
  pref = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
  lines = [dict(good, id=f"g{i}") for i in range(3)] + [dict(pref, id="the_pair")] + [dict(good, id="g3")] * 6
  (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return tmp_path


TRAIN_CASES = {
    # case: (arguments after `tiny output_dir=...`, fragments of the error line); {d}: the data_files folder
    "missing_data_file": (["data.source=json", "data.path={d}/missing.jsonl"], ["data.path", "missing.jsonl"]),
    "empty_data_file": (["data.source=json", "data.path={d}/empty.jsonl"], ["data.path", "holds no records"]),
    "bad_regex": (["optimizer.trainable=['(']"], ["optimizer.trainable", "not a valid regular expression"]),
    "bad_lora_regex": (["lora.targets=['[']"], ["lora.targets", "not a valid regular expression"]),
    "mesh_does_not_fit": (["mesh.data=3"], ["mesh data=3", "8 devices", "mesh.data"]),
    "mesh_zero": (["mesh.tensor=0"], ["mesh sizes", ">= 1"]),
    "zero_batch": (["global_batch_size=0"], ["global_batch_size must be >= 1"]),
    "zero_grad_accum": (["grad_accum_steps=0"], ["grad_accum_steps must be >= 1"]),
    "zero_checkpoint_every": (["checkpoint.every_steps=0"], ["checkpoint.every_steps must be >= 1"]),
    "zero_log_every": (["metrics.log_every_steps=0"], ["metrics.log_every_steps must be >= 1"]),
    "keep_zero": (["checkpoint.keep=0"], ["checkpoint.keep must be >= 1"]),
    "negative_lr": (["optimizer.peak_lr=-1e-3"], ["optimizer.peak_lr must be > 0"]),
    "end_above_peak": (["optimizer.end_lr=1.0"], ["optimizer.end_lr", "peak_lr"]),
    "beta2_one": (["optimizer.b2=1.0"], ["optimizer.b2 must be < 1"]),
    "zero_max_length": (["data.max_length=0"], ["data.max_length must be >= 1"]),
    "bad_skip_fraction": (["data.max_skip_fraction=0"], ["data.max_skip_fraction must be > 0"]),
    "process_id_out_of_range": (["distributed.num_processes=2", "distributed.process_id=2"],
                                ["distributed.process_id 2"]),
    "zero_hidden_size": (["model.overrides=[llm.hidden_size=0]"], ["llm.hidden_size must be >= 1"]),
    "vocab_below_tokenizer": (["model.overrides=[llm.vocab_size=1000]"], ["data.tokenizer has", "llm.vocab_size"]),
    "unknown_key": (["optimizer.peak_lrr=1"], ["optimizer.peak_lrr", "peak_lr"]),
    "fail_policy": (["data.max_length=10", "data.bad_sample_policy=fail"], ["bad sample", "max_length is 10"]),
    "every_sample_too_long": (["data.max_length=10"], ["stopped", "too_long", "max_length is 10"]),
    "every_sample_too_long_json": (["data.source=json", "data.path={d}/too_long.jsonl", "data.max_consecutive_skips=5"],
                                   ["5 samples in a row were bad", "too_long: 5"]),
    "mixed_file_fail": (["data.source=json", "data.path={d}/mixed.jsonl", "data.bad_sample_policy=fail",
                         "data.shuffle=false"], ["'the_pair'", "preference record"]),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_cli_reports_user_errors(case, tmp_path, data_files, capsys):
  args, fragments = TRAIN_CASES[case]
  args = [a.replace("{d}", str(data_files)) for a in args]
  assert_user_error(capsys, train_main(["tiny", f"output_dir={tmp_path / 'run'}", *QUICK, *args]), *fragments)
  assert not list((tmp_path / "run").glob("checkpoints/*")), "a failed start must not leave checkpoints"


def test_train_cli_config_file_errors(tmp_path, data_files, capsys):
  assert_user_error(capsys, train_main([str(data_files / "bad.yaml")]), "bad.yaml", "not valid YAML", "line 2")
  assert_user_error(capsys, train_main(["stage2"]), "no config named 'stage2'", "stage2_full", "stage1_adapter")
  assert_user_error(capsys, train_main([str(tmp_path / "nowhere.yaml")]), "nowhere.yaml", "does not exist")
  with pytest.raises(SystemExit) as exit_info:
    train_main(["tiny", "--no-such-flag"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: unrecognized arguments")


def test_train_cli_existing_run_init_and_resume_errors(trained, tmp_path, capsys):
  assert_user_error(capsys, train_main(["tiny", f"output_dir={trained}", *QUICK]), "already holds checkpoint step 1",
                    "--resume")
  # model.init plus a size override would train weights that do not match the saved config.
  init = [f"model.init={trained / 'model'}", f"output_dir={tmp_path / 'run'}"]
  overrides = "model.overrides=[llm.intermediate_size=128]"
  assert_user_error(capsys, train_main(["tiny", *QUICK, *init, overrides]), "model.overrides change the shapes",
                    "llm.model.layers.mlp", "model.init")
  assert_user_error(capsys, train_main(["tiny", *QUICK, f"model.init={tmp_path / 'none'}"]), "does not exist")


def test_skipped_samples_are_counted_in_the_report_and_metrics(tmp_path, capsys):
  good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}
  long = {"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "no"}]}
  lines = [dict(long if i % 4 == 0 else good, id=str(i)) for i in range(40)]  # 10 of 40 too long
  (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  out = tmp_path / "run"
  args = ["tiny", f"output_dir={out}", "data.source=json", f"data.path={tmp_path / 'data.jsonl'}", "steps=3",
          "data.shuffle=false", "global_batch_size=8", "eval.accuracy=false"]
  assert train_main(args) == 0
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/skipped"] for r in records] == [3, 6, 8]  # every 4th sample up to the 8th, 16th, 24th good one
  assert records[-1]["train/skipped_too_long"] == 8 and records[-1]["train/skipped_bad_image"] == 0
  captured = capsys.readouterr()
  assert "skipped 8 bad training samples: too_long 8" in captured.out + captured.err


def run_module(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "XLA_FLAGS": "", **(env or {})})


def test_a_real_process_exits_2_without_traceback_and_debug_shows_it():
  done = run_module("flashvl_jax.train", "tiny", "global_batch_size=0")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert "error: global_batch_size must be >= 1, got 0" in done.stderr
  debug = run_module("flashvl_jax.train", "tiny", "global_batch_size=0", env={"FLASHVL_DEBUG": "1"})
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_convert_cli_reports_user_errors(tmp_path, capsys):
  (tmp_path / "file.txt").write_text("x")
  cases = [
      (["inspect", str(tmp_path / "nowhere")], ["does not exist"]),
      (["inspect", str(tmp_path / "file.txt")], ["not a model checkpoint"]),
      (["export", str(tmp_path), "--out", str(tmp_path / "hf")], ["not a model checkpoint"]),
      (["hf", str(tmp_path), "--out", str(tmp_path / "ck")], ["config.json"]),
  ]
  for args, fragments in cases:
    assert_user_error(capsys, convert_main(args), *fragments)
  with pytest.raises(SystemExit) as exit_info:
    convert_main(["hf", str(tmp_path), "--out", str(tmp_path / "ck"), "--dtype", "int4"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: argument --dtype")


def test_chat_cli_reports_user_errors(tmp_path, trained, capsys):
  (tmp_path / "not_an_image.png").write_bytes(b"nope")
  model = str(trained / "model")
  cases = [
      ([str(tmp_path / "nowhere"), "hi"], ["does not exist"]),
      ([model, "hi", "--image", str(tmp_path / "not_an_image.png")], ["not_an_image.png"]),
      ([model, "hi", "--image", str(tmp_path / "missing.png")], ["missing.png"]),
      ([model, "hi", "--do-sample", "--temperature", "0"], ["temperature must be > 0"]),
      ([model, "hi", "--top-p", "1.5"], ["top_p"]),
      ([model, "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
      ([model, "hi", "--max-new-tokens", "100000"], ["leaves no room for a prompt"]),
      ([model, "why " * 100, "--max-length", "64", "--max-new-tokens", "4"], ["but max_length is 60"]),
  ]
  for args, fragments in cases:
    assert_user_error(capsys, chat_main(args), *fragments)


def test_bench_cli_reports_user_errors(capsys):
  from flashvl_jax.bench import main as bench_main
  with pytest.raises(SystemExit) as exit_info:
    bench_main(["--variants", "huge"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: unknown variants ['huge']")
