"""A new user's first commands: random checkpoints to try the tools, help texts that list the choices, chat's
length flags, and the periodic eval line of a training run."""

import subprocess
import sys

import pytest
from flax import nnx

from convert.__main__ import main as convert_main
from flashvl_jax import checkpoint
from flashvl_jax.api import FlashVL
from flashvl_jax.chat import main as chat_main
from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel
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
