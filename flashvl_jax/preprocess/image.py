"""Image loading and the two towers' image processors, equal to transformers' PIL-backend processors.

Each processor is split in two so pixels can travel as uint8 and be normalised on device:
- a host step, `resize_for_tower(image, kind, size)`: resize (and crop) -> uint8 [S, S, 3];
- a pure step, `normalize(pixels, kind)`: x / 255, then (x - mean) / std; NumPy or JAX, float32 out.

Kinds: `siglip` (SiglipImageProcessor as configured for SigLIP2-512: resize straight to SxS, BILINEAR,
mean = std = 0.5) and `clip` (CLIPImageProcessor for AIMv2: shortest edge to S, BICUBIC, centre crop SxS,
OpenAI CLIP statistics). Vision tower kinds are accepted too: `siglip` -> siglip, `aimv2` -> clip.
Arrays are HWC; HF returns CHW.
"""

from __future__ import annotations

import io
import os
import pathlib
import warnings
from typing import BinaryIO, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from flashvl_jax.errors import UserError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

_PROCESSOR_OF = {"siglip": "siglip", "clip": "clip", "aimv2": "clip"}  # accepted kind -> processor
_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
}
_RESAMPLE = {"siglip": Image.Resampling.BILINEAR, "clip": Image.Resampling.BICUBIC}

IMAGE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    k: _STATS[p] for k, p in _PROCESSOR_OF.items()
}  # kind -> (mean, std)
RESAMPLE: dict[str, Image.Resampling] = {k: _RESAMPLE[p] for k, p in _PROCESSOR_OF.items()}

# Shortest-edge resizing of a very elongated image needs a huge intermediate (1x5000 at S=448 is 448 x 2.2M
# pixels). Above this many pixels only the centre crop is resampled (PIL's `box`), at the cost of S*S. That
# differs slightly from HF's resize-then-crop (<= 2 intensity levels on smooth images, more on pixel noise).
MAX_RESIZE_PIXELS = 1 << 25


class ImageError(UserError, ValueError):
  """An image could not be read; the message names the file and the problem."""


def processor_kind(kind: str) -> str:
  """'siglip' or 'clip' for a processor or vision tower kind ('siglip', 'clip', 'aimv2')."""
  if kind not in _PROCESSOR_OF:
    raise ValueError(f"unknown image processor kind {kind!r}; use one of {sorted(_PROCESSOR_OF)}")
  return _PROCESSOR_OF[kind]


def to_8bit(image: Image.Image) -> Image.Image:
  """A 16-bit, 32-bit integer or float grayscale image (`I;16*`, `I`, `F`) as 8-bit `L`; other modes unchanged.

  PIL's own conversion clips these to 0..255, which saturates 16-bit images and blacks out [0, 1] floats.
  Here: `I;16*` is divided by 257 (65535 -> 255); `I` likewise when its values fit 0..65535, as they are
  when a 16-bit file opens as `I`, and as is when they fit 0..255; float values in [0, 1] are scaled by 255,
  values in 0..255 kept. Anything else (negative or larger values) is stretched from its min to its max.
  NaN becomes 0.
  """
  if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    return image
  values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
  if image.mode.startswith("I;16"):
    scale = 1 / 257
  elif image.mode == "F" and low >= 0 and high <= 1:
    scale = 255.0
  elif low >= 0 and high <= 255:
    scale = 1.0
  elif image.mode == "I" and low >= 0 and high <= 65535:
    scale = 1 / 257
  else:  # out of any usual range: stretch to 0..255
    values, scale = values - low, 255 / max(high - low, 1e-12)
  return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB by transformers' `convert_to_rgb` rule, after `to_8bit` for high-bit-depth modes.

  An image with an alpha band or a `transparency` entry is composited onto white; anything else is
  converted directly (so a palette's own alpha column is ignored, as in transformers 5). Unlike
  transformers, LAB's 'A' band is read as the colour axis it is, and premultiplied 'La' is supported.
  """
  image = to_8bit(image)
  if image.mode == "La":  # PIL converts it only to LA
    image = image.convert("LA")
  has_alpha = ("A" in image.getbands() and image.mode != "LAB") or image.info.get("transparency") is not None
  if has_alpha:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _open(source: ImageSource) -> tuple[str, BinaryIO | pathlib.Path]:
  """(name for messages, something `Image.open` reads), after checking for missing or empty input."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
    if not data:
      raise ImageError("image bytes are empty (0 bytes); pass the encoded file contents")
    return f"<{len(data)} bytes>", io.BytesIO(data)
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source)
    if not path.is_file():
      raise ImageError(f"image file '{path}' does not exist or is not a file")
    if path.stat().st_size == 0:
      raise ImageError(f"image file '{path}' is empty (0 bytes)")
    return f"image file '{path}'", path
  if hasattr(source, "read"):
    return f"image stream '{getattr(source, 'name', type(source).__name__)}'", source
  raise TypeError(f"load_image takes a path, bytes, a binary file object or a PIL image, got {type(source).__name__}")


def load_image(source: ImageSource) -> Image.Image:
  """Decodes an image fully, applies its EXIF orientation and converts it to RGB.

  Raises `ImageError` naming the file for missing, empty, corrupt, truncated or too large (more pixels
  than `PIL.Image.MAX_IMAGE_PIXELS`, PIL's decompression-bomb limit) images.
  """
  if isinstance(source, Image.Image):
    name, image = "PIL image", source
  else:
    name, fp = _open(source)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp) as opened:
          opened.load()
          image = opened.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise ImageError(f"{name} is too large: {e} Raise PIL.Image.MAX_IMAGE_PIXELS (now "
                       f"{Image.MAX_IMAGE_PIXELS}) if the file is trusted.") from e
    except Image.UnidentifiedImageError as e:
      raise ImageError(f"{name} is not a readable image (corrupt, or a format PIL does not support)") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ... on bad data
      problem = "is truncated" if "truncated" in str(e) else "could not be decoded"
      raise ImageError(f"{name} {problem}: {type(e).__name__}: {e}") from e
  try:
    image = ImageOps.exif_transpose(image)
  except Exception as e:
    raise ImageError(f"{name} has unreadable EXIF orientation data: {type(e).__name__}: {e}") from e
  return to_rgb(image)


def siglip_resize(image: Image.Image, size: int) -> np.ndarray:
  """SiglipImageProcessor's geometry: resize straight to size x size (aspect not kept), BILINEAR."""
  return np.asarray(to_rgb(image).resize((size, size), RESAMPLE["siglip"]))


def clip_resize_crop(image: Image.Image, size: int, max_resize_pixels: int = MAX_RESIZE_PIXELS) -> np.ndarray:
  """CLIPImageProcessor's geometry: shortest edge -> size (BICUBIC), then the centre size x size crop.

  If the short-edge-resized image would have more than `max_resize_pixels` pixels, only the crop is
  resampled (see `MAX_RESIZE_PIXELS`).
  """
  image = to_rgb(image)
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_long = int(size * long / short)  # HF's get_resize_output_image_size
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  if new_w * new_h > max_resize_pixels:
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(image.resize((size, size), RESAMPLE["clip"], box=box))
  resized = np.asarray(image.resize((new_w, new_h), RESAMPLE["clip"]))
  return resized[top:top + size, left:left + size]


def resize_for_tower(image: Image.Image, kind: str, size: int) -> np.ndarray:
  """The host half of the `kind` processor: uint8 [size, size, 3], not normalised."""
  resize = siglip_resize if processor_kind(kind) == "siglip" else clip_resize_crop
  return resize(image, size)


def normalize(pixels: np.ndarray | jax.Array, kind: str) -> np.ndarray | jax.Array:
  """(pixels / 255 - mean) / std in float32, channels last; NumPy in -> NumPy out, JAX in -> JAX out.

  `pixels` are intensities in [0, 255], uint8 or float (a float input is read on the same 0..255 scale).
  """
  mean, std = IMAGE_STATS[processor_kind(kind)]
  xp = jnp if isinstance(pixels, jax.Array) else np
  x = xp.asarray(pixels).astype(xp.float32) * xp.float32(1 / 255)
  return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def preprocess(image: Image.Image, kind: str, size: int) -> np.ndarray:
  """The whole processor: float32 [size, size, 3], equal to HF's pixel_values transposed to HWC."""
  return normalize(resize_for_tower(image, kind, size), kind)
