"""`FlashVL`: the user-facing model object (like the reference's `model` with `model.chat(...)`).

It holds the NNX module (`FlashVLModel`), the `Processor` (tiling + chat prompt + tokenizer), the mesh the
parameters live on and the `Sampler` that generates from them (built with the object). Loading is in
`flashvl_jax.checkpoint`, generation in `flashvl_jax.sampling`; the chat CLI (`python -m flashvl_jax.chat`) uses
this class.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax

from flashvl_jax import checkpoint, sampling
from flashvl_jax.config import FlashVLConfig
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.image import ImageSource
from flashvl_jax.preprocess.processor import Messages, Processor


def default_dtype() -> str:
  """bfloat16 on accelerators; float32 on CPU, where bf16 compute is several times slower."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


class FlashVL:
  """A Flash-VL model ready for inference: `FlashVL.from_pretrained(path)`, then `chat`, `generate` or call it."""

  def __init__(self, module: FlashVLModel, processor: Processor | None = None, mesh: jax.sharding.Mesh | None = None):
    self.module = module
    self.processor = processor if processor is not None else Processor.from_preset(module.config)
    self.mesh = mesh
    self.sampler = sampling.Sampler(module, mesh)

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
    module, tokenizer_source = checkpoint.load_model(path, dtype=dtype, mesh=mesh)
    processor = Processor.from_preset(module.config, tokenizer if tokenizer is not None else tokenizer_source,
                                      **processor_kwargs)
    return cls(module, processor, mesh)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> jax.Array:
    """Logits [B, T, V]: `input_ids` already hold the -200/-201 image positions; `pixel_values` are NHWC."""
    return self.module(input_ids, pixel_values, attention_mask, **kwargs)

  def generate(self, **kwargs) -> list[list[int]]:
    """New token ids per row; see `flashvl_jax.sampling.generate` for the arguments."""
    return sampling.generate(self.sampler, **kwargs)

  def chat(self, image: ImageSource | None, messages: Messages | str, *, max_new_tokens: int = 256,
           do_sample: bool = False, stream: bool = False, stop_ids: Sequence[int] | None = None,
           **sampling_kwargs) -> str | Iterator[str]:
    """The assistant's answer to `messages` about `image` (a PIL image, a path, or None for text only), like the
    reference's `model.chat`.

    messages: role/content dicts, user and assistant alternating, ending with the user turn to answer (a string
      is one user turn); the image goes with the first user turn. The prompt is the processor's chat template
      with the generation prompt. Greedy by default; `do_sample=True` with `temperature`, `top_k`, `top_p`,
      `seed` (see `sampling.generate`). Generation stops at the tokenizer's end-of-turn ids (or `stop_ids`),
      which are not part of the answer; special tokens are skipped as the reference decodes.
    stream: return an iterator of text pieces (decoded a few tokens at a time) that join to the answer.
    """
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    stop_ids = tuple(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
    batch = self.processor([image], [messages], add_generation_prompt=True)
    kwargs = dict(batch, max_new_tokens=max_new_tokens, do_sample=do_sample, stop_ids=stop_ids, **sampling_kwargs)
    if stream:
      return self._stream_text(kwargs, stop_ids)
    ids = sampling.generate(self.sampler, **kwargs)[0]
    return self.tokenizer.decode([i for i in ids if i not in stop_ids])

  def _stream_text(self, kwargs: dict[str, Any], stop_ids: tuple[int, ...]) -> Iterator[str]:
    decoder = self.tokenizer.stream_decoder()
    for chunk in sampling.stream(self.sampler, **kwargs):
      piece = decoder.push([i for i in chunk[0] if i not in stop_ids])
      if piece:
        yield piece
    tail = decoder.flush()
    if tail:
      yield tail
