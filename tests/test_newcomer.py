"""A new user's first commands: random checkpoints to try the tools, help texts that list the choices, chat's
length flags, and the periodic eval line of a training run."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx

from convert.__main__ import main as convert_main
from flashvl_jax import checkpoint, platforms
from flashvl_jax.api import FlashVL
from flashvl_jax.chat import main as chat_main
from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2
from flashvl_jax.train.__main__ import main as train_main


@pytest.mark.parametrize("layout", ["orbax", "hf"])
def test_convert_random_writes_a_loadable_checkpoint(tmp_path, layout, capsys):
  out = tmp_path / layout
  assert convert_main(["random", "--preset", "tiny-static", "--out", str(out), "--no-progress",
                       *(["--hf"] if layout == "hf" else [])]) == 0
  assert "random weights" in capsys.readouterr().out
  assert (out / ("config.json" if layout == "hf" else "metadata.json")).is_file()
  model = FlashVL.from_pretrained(str(out))
  assert model.config.llm == load_config("tiny-static").llm and isinstance(model.chat(None, "hi", max_new_tokens=3), str)
  if layout == "orbax":
    assert "data check: ok" in (convert_main(["inspect", str(out)]) == 0 and capsys.readouterr().out)
    assert convert_main(["random", "--preset", "tiny-static", "--out", str(out)]) == 2  # exists: --overwrite
  assert convert_main(["random", "--preset", "no-such", "--out", str(tmp_path / "x")]) == 2
  assert "no preset named 'no-such'" in capsys.readouterr().err


def test_help_texts_list_the_choices():
  train = subprocess.run([sys.executable, "-m", "flashvl_jax.train", "--help"], capture_output=True, text=True)
  assert train.returncode == 0 and "stage2_full" in train.stdout and "stage5_dpo" in train.stdout
  chat = subprocess.run([sys.executable, "-m", "flashvl_jax.chat", "--help"], capture_output=True, text=True)
  for text in ("/image PATH", "/reset", "/quit", "--max-length", "--truncate"):
    assert text in chat.stdout, text


def test_chat_max_length_and_truncate(tmp_path, capsys):
  out = tmp_path / "ck"
  checkpoint.save_model(out, FlashVLModel(load_config("tiny-static"), rngs=nnx.Rngs(0)))
  long = "why " * 200
  assert chat_main([str(out), long, "--max-length", "128", "--max-new-tokens", "2"]) == 2
  assert "but max_length is 126" in capsys.readouterr().err  # 128 minus the 2 new tokens
  assert chat_main([str(out), long, "--max-length", "128", "--max-new-tokens", "2", "--truncate"]) == 0


def test_periodic_evals_are_printed(tmp_path, capsys):
  assert train_main(["tiny", f"output_dir={tmp_path}", "steps=2", "eval.every_steps=1", "eval.accuracy=false",
                     "data.eval_size=8"]) == 0
  printed = capsys.readouterr()
  line = next(l for l in (printed.out + printed.err).splitlines() if l.startswith("step 1 eval "))
  assert "loss: " in line and "answer_accuracy: " in line


def test_no_libtpu_lines_without_a_tpu(tmp_path):
  """The `tpu` extra (installed by the test command) must not make every tool print libtpu's start-up warnings."""
  assert importlib.util.find_spec("libtpu"), "the test command installs the tpu extra: pip install -e '.[test,tpu]'"
  assert not platforms.might_have_tpu(), "this test expects a machine without TPU chips"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  run = subprocess.run([sys.executable, "-m", "convert", "random", "--preset", "tiny-static", "--no-progress",
                        "--out", str(tmp_path / "m")], capture_output=True, text=True, env=env)
  assert run.returncode == 0 and run.stderr == "", run.stderr
  probe = "import jax; from flashvl_jax import platforms; print(platforms.skip_absent_tpu(), jax.devices()[0].platform)"
  assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        env=env).stdout.split() == ["cpu", "cpu"]
  explicit = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**env, "JAX_PLATFORMS": "cpu"})
  assert explicit.stdout.split() == ["None", "cpu"]  # the user's JAX_PLATFORMS is obeyed, not replaced


def test_convert_hf_tiling_is_chosen_or_announced(tmp_path, capsys):
  """A released tiny-iss checkpoint has image_token_num != 576, so its tiling cannot be inferred as iss: the
  inferred mode is printed, and --preset / --tiling choose it."""
  hf = tmp_path / "hf"
  assert convert_main(["random", "--preset", "tiny-iss", "--out", str(hf), "--hf", "--no-progress"]) == 0
  capsys.readouterr()
  assert convert_main(["hf", str(hf), "--out", str(tmp_path / "inferred"), "--no-progress"]) == 0
  assert "tiling: dynamic (inferred; --preset or --tiling to choose)" in capsys.readouterr().out
  assert convert_main(["hf", str(hf), "--out", str(tmp_path / "preset"), "--preset", "tiny-iss", "--no-progress"]) == 0
  assert "tiling: iss (from --preset/--tiling)" in capsys.readouterr().out
  assert checkpoint.read_config(tmp_path / "preset").tiling == load_config("tiny-iss").tiling
  assert convert_main(["hf", str(hf), "--out", str(tmp_path / "mode"), "--tiling", "overlap", "--no-progress"]) == 0
  assert checkpoint.read_config(tmp_path / "mode").tiling.mode == "overlap"
  assert convert_main(["hf", str(hf), "--out", str(tmp_path / "x"), "--preset", "tiny-static"]) == 2
  assert "does not have the shapes" in capsys.readouterr().err
  qwen = tmp_path / "qwen"
  build_tiny_qwen2(qwen, seed=0)
  assert convert_main(["hf", str(qwen), "--out", str(tmp_path / "y"), "--tiling", "iss"]) == 2
  assert "apply to a Flash-VL checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("notebook", ["quickstart", "finetune"])
def test_notebook_install_cell(notebook, tmp_path, monkeypatch):
  """The first cell installs the package when it is missing: from the clone around the notebook, else from
  FLASHVL_SOURCE, else it says what to set (the old cell installed `flashvl-jax` from the index, where it is not)."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  cells = json.loads((repo / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
  install = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
  find_spec, commands = importlib.util.find_spec, []
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flashvl_jax" else find_spec(name, *a))
  monkeypatch.setattr(subprocess, "run", lambda command, check: commands.append(command))
  monkeypatch.delenv("FLASHVL_SOURCE", raising=False)
  monkeypatch.chdir(repo / "notebooks")
  exec(install, {})  # pylint: disable=exec-used
  assert commands[-1][1:5] == ["-m", "pip", "install", "-q"] and commands[-1][5] == str(repo)
  monkeypatch.setenv("FLASHVL_SOURCE", "git+https://example.org/you/flashvl_jax")
  exec(install, {})  # pylint: disable=exec-used
  assert commands[-1][5] == "git+https://example.org/you/flashvl_jax"
  monkeypatch.delenv("FLASHVL_SOURCE")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(RuntimeError, match="FLASHVL_SOURCE"):
    exec(install, {})  # pylint: disable=exec-used
