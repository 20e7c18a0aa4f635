"""The Flash-VL composite: vision tower -> pixel-shuffle adapter -> features spliced into Qwen2's embeddings.

Inputs follow the reference: `input_ids` hold each image as one `-200` followed by `n-1` x `-201`
placeholders; the k-th placeholder of a row receives the k-th image feature of that row. Negative ids
never reach the embedding table. Everything has static shapes, so the forward jits once per input shape.

Images arrive as tiles `pixel_values [B, n_tiles, S, S, 3]` (uint8, normalised here on device, or
already-normalised floats) plus `image_patch_index [B, T_img, f*f]`, the static gather plan from
`preprocess.tiling` that stitches (ISS) and pixel-shuffles the encoded patches. With no plan, each tile
is pixel-shuffled on its own, in tile order (static / dynamic without thumbnail).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax.config import FlashVLConfig
from flashvl_jax.models.adapter import Adapter, gather_patches
from flashvl_jax.models.aimv2 import Aimv2VisionTower
from flashvl_jax.models.layers import to_dtype
from flashvl_jax.models.qwen2 import Qwen2ForCausalLM
from flashvl_jax.models.siglip import SiglipVisionTower
from flashvl_jax.preprocess.image import normalize
from flashvl_jax.preprocess.tiling import pixel_shuffle_index

VISION_TOWERS = {"siglip": SiglipVisionTower, "aimv2": Aimv2VisionTower}


class FlashVLModel(nnx.Module):
  """`vit` + `adp` + `llm`, named like the released checkpoint's prefixes."""

  def __init__(self, cfg: FlashVLConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    self.vit = VISION_TOWERS[cfg.vision.kind](cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.adp = Adapter(cfg.adapter, cfg.vision.hidden_size, cfg.llm.hidden_size, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.llm = Qwen2ForCausalLM(cfg.llm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def default_patch_index(self, num_tiles: int) -> np.ndarray:
    """Each tile pixel-shuffled on its own, tiles in order: [num_tiles * tokens_per_tile, f*f]."""
    cfg = self.config
    g, f = cfg.vision.grid_size, cfg.adapter.shuffle_factor
    return np.concatenate([
        pixel_shuffle_index(g, g, f, cfg.adapter.token_order, offset=t * g * g) for t in range(num_tiles)
    ])

  def encode_images(self, pixel_values: jax.Array, image_patch_index: jax.Array | None = None) -> jax.Array:
    """Tiles [B, n, S, S, 3] (or one tile [B, S, S, 3]) -> image features [B, T_img, D_llm] in the LLM dtype."""
    if pixel_values.ndim == 4:
      pixel_values = pixel_values[:, None]
    b, n, h, w, c = pixel_values.shape
    pixels = pixel_values.reshape(b * n, h, w, c)
    if jnp.issubdtype(pixels.dtype, jnp.integer):
      pixels = normalize(pixels, self.config.vision.kind)
    pre_norm, post_norm = self.vit.forward_features(pixels)
    feats = post_norm if self.config.vision_feature == "post_norm" else pre_norm
    feats = feats.reshape(b, n * feats.shape[1], feats.shape[2])
    if image_patch_index is None:
      image_patch_index = jnp.asarray(self.default_patch_index(n))
    return self.adp(gather_patches(feats, image_patch_index))

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                   image_patch_index: jax.Array | None = None) -> jax.Array:
    """Token embeddings with image features written at the placeholder positions (ids < 0)."""
    is_image = input_ids < 0
    embeds = self.llm.embed(jnp.where(is_image, 0, input_ids))
    if pixel_values is None:
      return embeds
    feats = self.encode_images(pixel_values, image_patch_index).astype(embeds.dtype)
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)  # k-th placeholder -> feature k
    at_slot = jnp.take_along_axis(feats, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], at_slot, embeds)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, position_ids: jax.Array | None = None,
               image_patch_index: jax.Array | None = None, segment_ids: jax.Array | None = None,
               logits_at: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (fp32), or [B, K, V] at the positions `logits_at` [B, K]."""
    embeds = self.embed_inputs(input_ids, pixel_values, image_patch_index)
    return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                    segment_ids=segment_ids, logits_at=logits_at)


def check_image_placeholders(input_ids: np.ndarray, num_image_tokens: np.ndarray | int) -> None:
  """Host-side check that each row holds exactly as many placeholders as its image has tokens."""
  ids = np.asarray(input_ids)
  counts = (ids < 0).sum(axis=-1)
  expected = np.broadcast_to(np.asarray(num_image_tokens), counts.shape)
  bad = np.nonzero(counts != expected)[0]
  if bad.size:
    rows = ", ".join(f"row {r}: {counts[r]} placeholders vs {expected[r]} image tokens" for r in bad[:5])
    raise ValueError(f"image placeholders do not match the image token counts ({rows}); build inputs with "
                     f"flashvl_jax.preprocess.processor.Processor")
