"""`convert hf --verify`: the PyTorch model of the source and ours from the converted checkpoint on one probe input.

Components run in transformers (an Apple-layout AIMv2 is mapped to `Aimv2VisionModel` keys); Flash-VL runs in
`flashvl_jax.testing.torch_flashvl`. Both sides compute in fp32. Needs torch (the `test` extra).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax import checkpoint
from flashvl_jax.errors import MissingDependencyError

PROBE_TEXT = (5, 7)  # text tokens before / after the image block of the Flash-VL probe


def _torch_reference(hf: checkpoint.HFCheckpoint):
  try:
    # pylint: disable=import-outside-toplevel
    import torch
    import transformers
    from transformers import Aimv2VisionModel, Qwen2ForCausalLM, SiglipVisionModel

    from flashvl_jax.testing import tiny_vision, torch_flashvl
  except ImportError as e:
    raise MissingDependencyError(f"--verify runs the PyTorch model and needs torch and transformers ({e}); install "
                                 "them with `pip install -e '.[reference]'` (docs/install.md: the CPU build of torch)") from None
  transformers.utils.logging.disable_progress_bar()  # ours is the only progress shown

  path = str(hf.path)
  if hf.architecture == "flashvl":
    return torch_flashvl.load_released_layout(path)
  if hf.architecture == "aimv2" and hf.layout["vision"] == "apple":
    return tiny_vision.read_apple_layout(path)
  model_class = {"qwen2": Qwen2ForCausalLM, "siglip": SiglipVisionModel, "aimv2": Aimv2VisionModel}[hf.architecture]
  return model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def probe_inputs(hf: checkpoint.HFCheckpoint, seed: int = 0) -> dict[str, np.ndarray]:
  """Token ids (with the -200/-201 image block for Flash-VL) and / or NHWC pixels, standard normal."""
  rng = np.random.default_rng(seed)
  cfg = hf.config
  inputs = {}
  if hf.architecture in ("flashvl", "siglip", "aimv2"):
    vision = cfg.vision if hf.architecture == "flashvl" else cfg
    inputs["pixels"] = rng.standard_normal((1, vision.image_size, vision.image_size, 3)).astype(np.float32)
  if hf.architecture in ("flashvl", "qwen2"):
    vocab = (cfg.llm if hf.architecture == "flashvl" else cfg).vocab_size
    image = [-200] + [-201] * (cfg.tokens_per_tile - 1) if hf.architecture == "flashvl" else []
    ids = list(rng.integers(0, vocab, PROBE_TEXT[0])) + image + list(rng.integers(0, vocab, PROBE_TEXT[1]))
    inputs["input_ids"] = np.asarray([ids], np.int32)
  return inputs


def torch_outputs(model, architecture: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel

  pixels = None
  if "pixels" in inputs:
    pixels = torch.from_numpy(np.ascontiguousarray(inputs["pixels"].transpose(0, 3, 1, 2)))
  with torch.no_grad():
    if architecture == "flashvl":
      return model(torch.from_numpy(inputs["input_ids"].astype(np.int64)), pixels).numpy()
    if architecture == "qwen2":
      return model(torch.from_numpy(inputs["input_ids"].astype(np.int64))).logits.numpy()
    return model(pixel_values=pixels).last_hidden_state.numpy()


@nnx.jit
def _forward(module, *inputs):
  return module(*inputs)


def our_outputs(module, architecture: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
  names = {"flashvl": ("input_ids", "pixels"), "qwen2": ("input_ids",)}.get(architecture, ("pixels",))
  return np.asarray(_forward(module, *[jnp.asarray(inputs[n]) for n in names]))


TOLERANCE = 1e-4  # max abs difference per unit of output scale (fp32: 1e-4 on logits of magnitude ~1)


def verify(src: str | pathlib.Path, converted: str | pathlib.Path) -> tuple[float, float]:
  """(max abs difference, allowed) between the PyTorch model at `src` and ours restored (fp32) from `converted`;
  allowed is `TOLERANCE` times the largest output magnitude (at least 1).

  Logits for Qwen2 and Flash-VL, `last_hidden_state` for the vision towers.
  """
  hf = checkpoint.open_hf(src)
  inputs = probe_inputs(hf)
  expected = torch_outputs(_torch_reference(hf), hf.architecture, inputs)
  module, _ = checkpoint.load_module(converted, dtype="float32", architecture=hf.architecture)
  diff = float(np.abs(our_outputs(module, hf.architecture, inputs) - expected).max())
  return diff, TOLERANCE * max(1.0, float(np.abs(expected).max()))
