"""`chat` on tiny random models with the real Qwen vocabulary (static, dynamic, iss), and the CLI.

Random weights answer gibberish (multi-byte characters included, which exercises the streaming decoder); what
is checked is the plumbing: the answer is the tokenizer's decoding of what `generate` returns for the
processor's prompt, minus the end-of-turn id, and streamed pieces join to the same text.
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flashvl_jax import chat
from flashvl_jax.api import FlashVL
from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.testing.random_flashvl import write_random_checkpoint

QUESTION = [{"role": "user", "content": "What is in the picture?"}]
NEW = 12


def picture(seed=0, size=(120, 90)):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


@pytest.fixture(scope="module", params=["tiny-static", "tiny-dynamic", "tiny-iss"])
def model(request):
  return FlashVL(FlashVLModel(load_config(request.param), rngs=nnx.Rngs(0)))


def expected_answer(model, image, messages):
  batch = model.processor([image], [messages], add_generation_prompt=True)
  ids = model.generate(**batch, max_new_tokens=NEW, stop_ids=model.tokenizer.eos_ids)[0]
  return model.tokenizer.decode([i for i in ids if i not in model.tokenizer.eos_ids]), ids


def test_chat_answer_stream_and_stop_ids(model):
  image = picture()
  answer = model.chat(image, QUESTION, max_new_tokens=NEW)
  expected, ids = expected_answer(model, image, QUESTION)
  assert isinstance(answer, str) and answer == expected and len(answer) > 0
  pieces = list(model.chat(image, QUESTION, max_new_tokens=NEW, stream=True))
  assert len(pieces) >= 2 and all(pieces)
  assert "".join(pieces) == answer
  assert model.chat(picture(seed=1), QUESTION, max_new_tokens=NEW) != answer  # the image is seen
  # a stop id the model produces ends the answer there and is not part of it
  cut = ids[3]
  shorter = model.chat(image, QUESTION, max_new_tokens=NEW, stop_ids=[cut])
  assert shorter == model.tokenizer.decode(ids[:ids.index(cut)])


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """A random tiny-static Flash-VL in the released Hugging Face layout, and an image file."""
  root = tmp_path_factory.mktemp("chat_cli")
  write_random_checkpoint("tiny-static", root / "hf")
  picture().save(root / "picture.png")
  return root / "hf", root / "picture.png"


@pytest.fixture(scope="module")
def hf_model(hf_checkpoint):
  return FlashVL.from_pretrained(str(hf_checkpoint[0]))


def test_cli_one_question(hf_checkpoint, hf_model):
  path, image = hf_checkpoint
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "flashvl_jax.chat", str(path), "--image", str(image), "What is it?",
                        "--max-new-tokens", "6"], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  expected = hf_model.chat(str(image), [{"role": "user", "content": "What is it?"}], max_new_tokens=6)
  assert expected and out.stdout == expected + "\n"


def test_cli_rejects_a_missing_image(hf_checkpoint, tmp_path, capsys):
  assert chat.main([str(hf_checkpoint[0]), "--image", str(tmp_path / "missing.png"), "Hi"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "missing.png" in err


def test_interactive_session(hf_checkpoint, hf_model):
  """Multi-turn, /reset, /image none (text only), a bad /image, /quit."""
  image = hf_checkpoint[1]
  lines = io.StringIO(f"What is it?\nAnd the colours?\n/reset\nWhat is it?\n/image none\nHello\n"
                      f"/image {image.parent / 'missing.png'}\n/quit\nnot read\n")
  out = io.StringIO()
  chat.interactive(hf_model, str(image), lines, out, max_new_tokens=6)
  ask = lambda image, messages: hf_model.chat(image, messages, max_new_tokens=6)
  first = ask(str(image), [{"role": "user", "content": "What is it?"}])
  second = ask(str(image), [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": first},
                            {"role": "user", "content": "And the colours?"}])
  hello = ask(None, [{"role": "user", "content": "Hello"}])
  expected = ["Type a message; /image PATH (or none), /reset, /quit.", first, second, "(conversation cleared)", first,
              "(new conversation without an image)", hello]
  text = out.getvalue()
  assert text.startswith("\n".join(expected) + "\n"), text
  assert second != ask(str(image), [{"role": "user", "content": "And the colours?"}])  # the history counts
  last = text.splitlines()[-1]
  assert last.startswith("error:") and "missing.png" in last
