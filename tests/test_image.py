"""Image loading and the SigLIP / CLIP processors against transformers' PIL-backend processors."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from flashvl_jax.preprocess import image as image_lib
from flashvl_jax.preprocess.image import ImageError, load_image, normalize, preprocess, resize_for_tower

# SigLIP2-512 (google/siglip2-*-patch16-512 preprocessor_config) and AIMv2-448 (CLIP-style) settings.
HF_PROCESSORS = {
    "siglip": (SiglipImageProcessorPil(size={"height": 512, "width": 512}, resample=Image.Resampling.BILINEAR,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3), 512),
    "aimv2": (CLIPImageProcessorPil(size={"shortest_edge": 448}, crop_size={"height": 448, "width": 448}), 448),
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def in_mode(mode: str, width: int = 97, height: int = 61) -> Image.Image:
  """A noise image in PIL `mode`."""
  rgba = Image.fromarray(noise(width, height, channels=4), "RGBA")
  if mode == "P+transparency":
    pal = rgba.convert("RGB").quantize(16)
    pal.info["transparency"] = 3
    return pal
  return rgba.convert(mode)


CASES = ([(f"rgb_{w}x{h}", lambda w=w, h=h: Image.fromarray(noise(w, h)))
          for w, h in [(640, 480), (480, 640), (1, 1), (1, 40), (40, 1), (333, 1001), (1999, 1501)]] +
         [(mode, lambda mode=mode: in_mode(mode))
          for mode in ["L", "LA", "P", "P+transparency", "PA", "RGBA", "CMYK", "1", "YCbCr"]])
# Not "I;16", "I", "F": transformers clips their samples to 0..255 (a 16-bit image saturates, a [0, 1] float one
# is black); we scale them to 8 bits (`test_high_bit_depth_images_are_scaled_to_8_bits`).


@pytest.mark.parametrize("kind", ["siglip", "aimv2"])
def test_processors_match_transformers_pil_backend(kind):
  processor, size = HF_PROCESSORS[kind]
  worst = 0.0
  for name, make in CASES:
    img = make()
    ref = processor(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)  # CHW -> HWC
    ours = preprocess(load_image(img), kind, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32, name
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-5, f"{kind} {name}: max abs diff {diff}"
    worst = max(worst, diff)
  print(f"{kind}: max abs diff over {len(CASES)} images {worst:.2e}")


def test_host_step_is_uint8_and_normalize_runs_on_numpy_and_jax():
  img = Image.fromarray(noise(300, 200))
  for kind in ["siglip", "clip", "aimv2"]:
    pixels = resize_for_tower(img, kind, 64)
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
    host = normalize(pixels, kind)
    device = jax.jit(normalize, static_argnums=1)(jnp.asarray(pixels), kind)
    from_float = normalize(pixels.astype(np.float32), kind)
    assert host.dtype == np.float32 and isinstance(host, np.ndarray)
    assert device.dtype == jnp.float32 and isinstance(device, jax.Array)
    np.testing.assert_allclose(np.asarray(device), host, atol=1e-6)
    np.testing.assert_array_equal(from_float, host)
  mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
  extremes = normalize(np.array([[[0] * 3, [255] * 3]], np.uint8), "aimv2")[0]
  np.testing.assert_allclose(extremes, [-mean / std, (1 - mean) / std], atol=1e-6)
  np.testing.assert_allclose(normalize(np.array([0, 255], np.uint8)[:, None], "siglip")[:, 0], [-1, 1])
  with pytest.raises(ValueError, match="unknown image processor kind 'vit'"):
    normalize(np.zeros((2, 2, 3), np.uint8), "vit")


def test_transparency_is_composited_onto_white():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
  rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
  out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
  np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
  np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
  la = Image.fromarray(np.array([[[7, 0], [7, 255]]], np.uint8), "LA")
  np.testing.assert_array_equal(np.asarray(load_image(la))[0], [(255, 255, 255), (7, 7, 7)])
  palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  palette.putpalette([200, 0, 0, 0, 200, 0])
  palette.info["transparency"] = 0
  np.testing.assert_array_equal(np.asarray(load_image(palette))[0], [(255, 255, 255), (0, 200, 0)])
  assert load_image(Image.new("La", (3, 2))).mode == "RGB"
  lab = Image.new("LAB", (2, 2), (60, 20, 0))  # its 'A' band is a colour axis, not alpha
  np.testing.assert_array_equal(np.asarray(load_image(lab)), np.asarray(lab.convert("RGB")))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_load_image_accepts_paths_bytes_streams_and_pil(tmp_path):
  img = Image.fromarray(noise(31, 17)).convert("L")
  data = encoded(img, "PNG")
  path = tmp_path / "gray.png"
  path.write_bytes(data)
  expected = np.repeat(np.asarray(img)[..., None], 3, axis=-1)
  for source in [str(path), path, data, bytearray(data), io.BytesIO(data), img]:
    out = load_image(source)
    assert out.mode == "RGB" and out.size == (31, 17)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_exif_orientation_is_applied():
  stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high: left half red, right half blue
  stored[:, :20] = (255, 0, 0)
  stored[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation 6: rotate 90 degrees clockwise to display
  out = load_image(encoded(Image.fromarray(stored), "PNG", exif=exif.tobytes()))
  assert out.size == (20, 40)  # displayed 20 wide x 40 high: the left half is now on top
  np.testing.assert_array_equal(np.asarray(out)[5, 10], (255, 0, 0))
  np.testing.assert_array_equal(np.asarray(out)[35, 10], (0, 0, 255))


def test_unreadable_images_raise_image_error_naming_the_file(tmp_path):
  with pytest.raises(ImageError, match=r"'.*missing\.png' does not exist"):
    load_image(tmp_path / "missing.png")
  (tmp_path / "empty.jpg").write_bytes(b"")
  with pytest.raises(ImageError, match=r"'.*empty\.jpg' is empty"):
    load_image(tmp_path / "empty.jpg")
  with pytest.raises(ImageError, match="empty"):
    load_image(b"")
  (tmp_path / "junk.png").write_bytes(np.random.default_rng(0).bytes(500))
  with pytest.raises(ImageError, match=r"'.*junk\.png' is not a readable image"):
    load_image(tmp_path / "junk.png")
  for fmt in ["PNG", "JPEG"]:
    data = encoded(Image.fromarray(noise(64, 64)), fmt)
    (tmp_path / f"cut.{fmt}").write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageError, match=rf"'.*cut\.{fmt}' (is truncated|could not be decoded)"):
      load_image(tmp_path / f"cut.{fmt}")
  with pytest.raises(TypeError, match="load_image takes a path"):
    load_image(123)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  for side in [40, 100]:  # 1600 px: PIL only warns (1-2x the limit); 10000 px: PIL raises
    (tmp_path / f"big{side}.png").write_bytes(encoded(Image.new("RGB", (side, side)), "PNG"))
    with pytest.raises(ImageError, match=rf"'.*big{side}\.png' is too large.*MAX_IMAGE_PIXELS"):
      load_image(tmp_path / f"big{side}.png")
  (tmp_path / "ok.png").write_bytes(encoded(Image.new("RGB", (30, 30)), "PNG"))
  assert load_image(tmp_path / "ok.png").size == (30, 30)


def test_tiny_and_elongated_images():
  for size in [(1, 1), (1, 5000), (5000, 1)]:
    img = load_image(Image.fromarray(noise(*size)))
    for kind in ["siglip", "aimv2"]:
      out = preprocess(img, kind, 448)
      assert out.shape == (448, 448, 3) and np.isfinite(out).all()
  # Past MAX_RESIZE_PIXELS only the crop is resampled: close to HF's resize-then-crop on a smooth image.
  y, x = np.mgrid[0:2000, 0:30]
  smooth = np.stack([128 + 100 * np.sin(x / 7 + y / 13), 128 + 100 * np.cos(y / 5), x * 8], -1).astype(np.uint8)
  img = Image.fromarray(smooth)
  exact = image_lib.clip_resize_crop(img, 448).astype(int)
  cropped_only = image_lib.clip_resize_crop(img, 448, max_resize_pixels=0)
  assert np.abs(exact - cropped_only).max() <= 3


RAMP16 = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
# PIL's own convert("RGB") clips these to 0..255 (a 16-bit PNG opened from a file it converts correctly)
PIL_GETS_WRONG = ("I;16B", "I, 16-bit values", "I, out of range: stretched", "F in [0, 1]")


@pytest.mark.parametrize("name, make, expected", [
    ("I;16 from a 16-bit PNG", lambda: RAMP16, (RAMP16 / 257).round()),
    ("I;16B", lambda: RAMP16.astype(">u2"), (RAMP16 / 257).round()),
    ("I, 16-bit values", lambda: RAMP16.astype(np.int32), (RAMP16 / 257).round()),
    ("I, 8-bit values", lambda: (RAMP16 // 257).astype(np.int32), RAMP16 // 257),
    ("I, out of range: stretched", lambda: RAMP16.astype(np.int32) * 4 - 1000,
     ((RAMP16.astype(np.float64) * 4 - 1000 + 1000) * 255 / (65535 * 4)).round()),
    ("F in [0, 1]", lambda: (RAMP16 / 65535).astype(np.float32), (RAMP16 / 65535 * 255).round()),
    ("F in 0..255", lambda: (RAMP16 / 257).astype(np.float32), (RAMP16 / 257).round()),
])
def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path, name, make, expected):
  """16-bit, 32-bit integer and float grayscale: scaled, not clipped (PIL's own convert saturates several or
  blacks them out). The first case goes through a real 16-bit PNG file and `load_image`."""
  image = Image.fromarray(make())
  if name.startswith("I;16 from"):
    image.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    rgb = np.asarray(load_image(tmp_path / "deep.png"))  # load_image returns RGB
  else:
    rgb = np.asarray(image_lib.to_rgb(image))
  assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
  np.testing.assert_allclose(rgb[..., 0], expected, atol=1)
  assert (rgb[..., 0] == rgb[..., 2]).all()
  if name in PIL_GETS_WRONG:  # what this fixes
    assert not np.allclose(np.asarray(image.convert("RGB"))[..., 0], expected, atol=1)


def test_float_nan_becomes_black():
  values = np.full((4, 4), 0.5, np.float32)
  values[0, 0] = np.nan
  rgb = np.asarray(image_lib.to_rgb(Image.fromarray(values)))
  assert rgb[0, 0, 0] == 0 and (rgb[1:, :, 0] == 128).all()
