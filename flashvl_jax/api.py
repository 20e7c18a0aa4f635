"""`FlashVL`: the user-facing model object (like the reference's `model` with `model.chat(...)`).

It holds the NNX module (`FlashVLModel`), the `Processor` (tiling + chat prompt + tokenizer) and the mesh
the parameters live on. Loading is in `flashvl_jax.checkpoint`, generation in `flashvl_jax.sampling`, chat in
`flashvl_jax.chat`; this class only ties them together.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax

from flashvl_jax.config import FlashVLConfig
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.processor import Processor


class FlashVL:
  """A Flash-VL model ready for inference: `FlashVL.from_pretrained(path)`, then `chat`, `generate` or call it."""

  def __init__(self, module: FlashVLModel, processor: Processor | None = None, mesh: jax.sharding.Mesh | None = None):
    self.module = module
    self.processor = processor if processor is not None else Processor.from_preset(module.config)
    self.mesh = mesh

  @property
  def config(self) -> FlashVLConfig:
    return self.module.config

  @property
  def tokenizer(self):
    return self.processor.tokenizer

  @classmethod
  def from_pretrained(cls, path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                      tokenizer: Any = None, **processor_kwargs) -> "FlashVL":
    """Loads an Orbax checkpoint written by `convert` (or an HF directory, converted on the fly).

    Parameters are restored straight into the shardings `sharding.RULES` give on `mesh` (default: one device).
    The tokenizer comes from the checkpoint directory when it holds one, else the built-in Qwen2.5 vocabulary.
    """
    from flashvl_jax import checkpoint

    module, tokenizer_source = checkpoint.load_model(path, dtype=dtype, mesh=mesh)
    processor = Processor.from_preset(module.config, tokenizer if tokenizer is not None else tokenizer_source,
                                      **processor_kwargs)
    return cls(module, processor, mesh)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> jax.Array:
    """Logits [B, T, V]: `input_ids` already hold the -200/-201 image positions; `pixel_values` are NHWC."""
    return self.module(input_ids, pixel_values, attention_mask, **kwargs)

  def generate(self, **kwargs) -> list[list[int]]:
    """New token ids per row; see `flashvl_jax.sampling.generate` for the arguments."""
    from flashvl_jax import sampling

    return sampling.generate(self, **kwargs)

  def chat(self, image, messages, *, max_new_tokens: int = 256, do_sample: bool = False, stream: bool = False,
           **kwargs) -> str | Iterator[str]:
    """Answers the conversation `messages` about `image` (a PIL image, a path, or None), like the reference."""
    from flashvl_jax import chat

    return chat.chat(self, image, messages, max_new_tokens=max_new_tokens, do_sample=do_sample, stream=stream,
                     **kwargs)
