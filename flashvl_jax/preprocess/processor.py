"""`Processor`: images + conversations -> fixed-shape NumPy arrays for the model, Hugging Face style.

  processor = Processor.from_preset("flashvl-2b-dynamic-iss", "qwen2.5", max_length=2048)
  batch = processor([image, None], [messages_a, messages_b])

Per example: the image is loaded (`image.load_image`), tiled (`tiling.make_plan`) and padded to the config's
static tile / token counts (`tiling.pad_plan`); the conversation is rendered and tokenized with its image block
expanded (`prompt.encode_conversation`) and padded right to `max_length` with the tokenizer's pad id.

Arrays (the batch dimension B only from `__call__`):
  input_ids          [B, L] int32   token ids; image positions hold -200 (first) / -201; padding = pad id
  attention_mask     [B, L] int32   1 on real tokens, 0 on padding
  loss_mask          [B, L] int32   1 on assistant answer tokens (and their <|im_end|>), else 0
  pixel_values       [B, T, S, S, 3] uint8   tiles, zeros after the real ones (T = tiling.max_tiles(cfg))
  tile_mask          [B, T] bool
  image_patch_index  [B, N, f*f] int32   per image token, its source patches (N = tiling.max_image_tokens(cfg))
  num_image_tokens   [B] int32      placeholders in input_ids (0 for a text-only row)

With `tiling.slice_markers`, each entry of the plan's `tile_token_counts` (a tile; for ISS the stitched grid,
then the thumbnail) is wrapped in the `slice_marker_tokens` pair.

A prompt longer than `max_length` raises `PromptTooLongError`. With `truncate=True` the leftmost text tokens
are dropped instead (system prompt and earliest turns first); the image block (placeholders and slice markers)
is never cut, and a prompt whose image block alone does not fit still raises.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from flashvl_jax.config import FlashVLConfig, load_config
from flashvl_jax.errors import UserError
from flashvl_jax.preprocess import tiling
from flashvl_jax.preprocess.image import ImageSource, load_image
from flashvl_jax.preprocess.prompt import DEFAULT_SLICE_MARKERS, DEFAULT_SYSTEM_PROMPT, encode_conversation
from flashvl_jax.preprocess.tokenizer import Tokenizer, load_tokenizer

Messages = Sequence[Mapping[str, Any]]


class PromptTooLongError(UserError, ValueError):
  """An encoded conversation does not fit in the processor's max_length."""


class Processor:
  """Images + conversations -> the model's fixed-shape inputs (see the module docstring for the arrays)."""

  def __init__(self, config: FlashVLConfig, tokenizer: Tokenizer, *, max_length: int = 2048,
               system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
               slice_marker_tokens: tuple[str, str] = DEFAULT_SLICE_MARKERS, truncate: bool = False,
               special_tokens_in_text: bool = False):
    self.config = config
    self.special_tokens_in_text = special_tokens_in_text  # trusted prompts only: see `prompt.encode_conversation`
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.system_prompt = system_prompt
    self.truncate = truncate
    self.max_tiles = tiling.max_tiles(config)
    self.max_image_tokens = tiling.max_image_tokens(config)
    self.slice_marker_ids = None
    if config.tiling.slice_markers:
      ids = tuple(tokenizer.token_to_id(t) for t in slice_marker_tokens)
      if None in ids:
        raise ValueError(f"slice marker tokens {slice_marker_tokens} are not all single tokens of the tokenizer "
                         f"(ids {ids}); pass slice_marker_tokens that exist in its vocabulary")
      self.slice_marker_ids = ids

  @classmethod
  def from_preset(cls, name_or_config: str | os.PathLike | FlashVLConfig,
                  tokenizer: Tokenizer | str | os.PathLike = "qwen2.5", **kwargs) -> Processor:
    """A processor for a model preset name (e.g. 'flashvl-2b-dynamic-iss'), a YAML path or a `FlashVLConfig`;
    `tokenizer` is a `Tokenizer` or a `load_tokenizer` source ('qwen2.5' or a Hugging Face directory)."""
    return cls(load_config(name_or_config), load_tokenizer(tokenizer), **kwargs)

  def num_image_tokens(self, size: tuple[int, int]) -> int:
    """Image tokens of an image of size (width, height)."""
    return tiling.num_image_tokens(size[0], size[1], self.config)

  def _empty_image(self) -> dict[str, Any]:
    s, f = self.config.vision.image_size, self.config.adapter.shuffle_factor
    return dict(pixel_values=np.zeros((self.max_tiles, s, s, 3), np.uint8),
                tile_mask=np.zeros((self.max_tiles,), bool),
                image_patch_index=np.zeros((self.max_image_tokens, f * f), np.int32), num_image_tokens=0)

  def _fit(self, input_ids: list[int], loss_mask: list[int]) -> tuple[list[int], list[int]]:
    """Checks the length; with `truncate`, drops the leftmost tokens outside the image block."""
    excess = len(input_ids) - self.max_length
    if excess <= 0:
      return input_ids, loss_mask
    in_image = np.asarray(input_ids) < 0
    if self.slice_marker_ids is not None:
      in_image |= np.isin(input_ids, self.slice_marker_ids)
    if not self.truncate or (~in_image).sum() < excess:
      raise PromptTooLongError(
          f"the encoded conversation has {len(input_ids)} tokens ({int(in_image.sum())} in the image block) but "
          f"max_length is {self.max_length}; raise max_length, shorten the conversation"
          + ("" if self.truncate else ", or pass truncate=True to drop the leftmost text tokens"))
    drop = np.flatnonzero(~in_image)[:excess]
    keep = np.ones(len(input_ids), bool)
    keep[drop] = False
    return np.asarray(input_ids)[keep].tolist(), np.asarray(loss_mask)[keep].tolist()

  def encode_example(self, image: ImageSource | None, messages: Messages, *, add_generation_prompt: bool = False,
                     max_tiles: int | None = None) -> dict[str, np.ndarray]:
    """One example's arrays, without the batch dimension; `image=None` for a text-only conversation.

    max_tiles: tile the image into at most this many tiles (fewer image tokens; the arrays keep their shapes).
    """
    if image is None:
      plan, padded = None, self._empty_image()
    else:
      config = self.config
      if max_tiles is not None and max_tiles < config.tiling.max_tiles:
        config = dataclasses.replace(config, tiling=dataclasses.replace(config.tiling, max_tiles=max(max_tiles, 1)))
      plan = tiling.make_plan(load_image(image), config)
      padded = tiling.pad_plan(plan, self.config)
    encoded = encode_conversation(self.tokenizer, messages, plan=plan, add_generation_prompt=add_generation_prompt,
                                  system_prompt=self.system_prompt, slice_marker_ids=self.slice_marker_ids,
                                  image_token_id=self.config.image_token_id,
                                  image_pad_token_id=self.config.image_pad_token_id,
                                  special_tokens_in_text=self.special_tokens_in_text)
    input_ids, loss_mask = self._fit(encoded["input_ids"], encoded["loss_mask"])
    n = len(input_ids)
    out = dict(input_ids=np.full((self.max_length,), self.tokenizer.pad_id, np.int32),
               attention_mask=np.zeros((self.max_length,), np.int32),
               loss_mask=np.zeros((self.max_length,), np.int32))
    out["input_ids"][:n] = input_ids
    out["attention_mask"][:n] = 1
    out["loss_mask"][:n] = loss_mask
    out.update(pixel_values=padded["pixel_values"], tile_mask=padded["tile_mask"],
               image_patch_index=padded["image_patch_index"],
               num_image_tokens=np.asarray(padded["num_image_tokens"], np.int32))
    return out

  def __call__(self, images: Sequence[ImageSource | None], conversations: Sequence[Messages], *,
               add_generation_prompt: bool = False) -> dict[str, np.ndarray]:
    """A batch: one image (or None) per conversation; every array gets a leading batch dimension."""
    if len(images) != len(conversations) or not conversations:
      raise ValueError(f"got {len(images)} images and {len(conversations)} conversations; pass one image (or "
                       "None) per conversation, at least one")
    examples = [self.encode_example(image, messages, add_generation_prompt=add_generation_prompt)
                for image, messages in zip(images, conversations)]
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
