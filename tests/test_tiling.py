"""Tiling geometry: token counts per mode and grid, the grid rule, and ISS stitching checked through an encoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.preprocess.image import resize_for_tower
from flashvl_jax.preprocess.tiling import (choose_grid, make_plan, max_image_tokens, max_tiles, num_image_tokens,
                                           pad_plan)

BICUBIC = Image.Resampling.BICUBIC  # AIMv2 (CLIP processor) resampling


def config(preset: str, vision: dict | None = None, adapter: dict | None = None, **tiling):
  cfg = load_config(preset)
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **(vision or {})),
                             adapter=dataclasses.replace(cfg.adapter, **(adapter or {})),
                             tiling=dataclasses.replace(cfg.tiling, **tiling))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# AIMv2-448/14: 32x32 patches per tile, 256 tokens per tile; ISS margin 4 -> 24x24 core -> 144 tokens per tile.
AIM = "flashvl-2b-dynamic"


@pytest.mark.parametrize("cfg, size, grid, counts", [
    (config("flashvl-2b-static"), (640, 480), (1, 1), (256,)),
    (config(AIM, mode="static"), (640, 480), (1, 1), (256,)),
    (config(AIM, mode="dynamic", thumbnail=False), (300, 300), (1, 1), (256,)),
    (config(AIM, mode="dynamic", thumbnail=False), (1000, 500), (1, 2), (256,) * 2),
    (config(AIM, mode="dynamic", thumbnail=False), (900, 900), (2, 2), (256,) * 4),
    (config(AIM, mode="dynamic", thumbnail=True), (300, 300), (1, 1), (256,)),  # no thumbnail for one tile
    (config(AIM, mode="dynamic", thumbnail=True), (1000, 500), (1, 2), (256,) * 3),
    (config(AIM, mode="dynamic", thumbnail=True), (900, 900), (2, 2), (256,) * 5),
    (config(AIM, mode="overlap", thumbnail=False), (1000, 500), (1, 2), (256,) * 2),
    (config(AIM, mode="overlap", thumbnail=True), (900, 900), (2, 2), (256,) * 5),
    (config(AIM, mode="iss", thumbnail=False), (300, 300), (1, 1), (144,)),
    (config(AIM, mode="iss", thumbnail=False), (1000, 500), (1, 2), (288,)),
    (config(AIM, mode="iss", thumbnail=False), (500, 1000), (2, 1), (288,)),
    (config(AIM, mode="iss", thumbnail=False), (1500, 500), (1, 3), (432,)),
    (config(AIM, mode="iss", thumbnail=False), (900, 900), (2, 2), (576,)),
    (config(AIM, mode="iss", thumbnail=True), (900, 900), (2, 2), (576, 256)),
])
def test_token_counts_per_mode_and_grid(cfg, size, grid, counts):
  plan = make_plan(noise_image(*size), cfg)
  assert plan.grid == grid
  assert plan.tile_token_counts == counts
  assert plan.num_tokens == sum(counts) == num_image_tokens(*size, cfg)
  n_tiles = grid[0] * grid[1] + int(cfg.tiling.thumbnail and grid != (1, 1))
  assert plan.tiles.shape == (n_tiles, cfg.vision.image_size, cfg.vision.image_size, 3)
  assert plan.tiles.dtype == np.uint8 and plan.patch_index.dtype == np.int32
  assert plan.patch_index.shape == (sum(counts), 4)


def test_preset_iss_gives_576_tokens_and_static_bounds():
  iss = load_config("flashvl-2b-dynamic-iss")
  assert num_image_tokens(800, 700, iss) == 576 and max_image_tokens(iss) == 576 and max_tiles(iss) == 4
  dyn = load_config("flashvl-2b-dynamic")  # 4 tiles + thumbnail
  assert max_image_tokens(dyn) == 5 * 256 and max_tiles(dyn) == 5
  static = load_config("flashvl-2b-static")
  assert max_image_tokens(static) == 256 and max_tiles(static) == 1


@pytest.mark.parametrize("size, max_n, grid", [
    ((448, 448), 4, (1, 1)),  # exact tie with 2x2, but area 200704 <= 0.5 * 448^2 * 4
    ((900, 900), 4, (2, 2)),  # same tie, area 810000 > 401408
    ((800, 700), 4, (2, 2)),  # |8/7 - 1| ties between 1x1 and 2x2; large area
    ((1200, 800), 4, (2, 2)),  # 3:2 ties 1x1, 1x2 and 2x2 (0.5 each): the last large enough wins
    ((150, 100), 4, (1, 1)),  # same ratio, small area
    ((1000, 500), 4, (1, 2)),
    ((500, 1000), 4, (2, 1)),
    ((1, 5000), 4, (4, 1)),
    ((5000, 1), 4, (1, 4)),
    ((5000, 1), 1, (1, 1)),
    ((3000, 1000), 6, (1, 3)),  # 2x6 would exceed 6 tiles
])
def test_choose_grid_follows_internvl_rule(size, max_n, grid):
  assert choose_grid(*size, max_n, 448) == grid


def test_choose_grid_picks_a_closest_aspect_ratio():
  rng = np.random.default_rng(0)
  for _ in range(500):
    w, h = (int(v) for v in rng.integers(1, 4000, 2))
    n = int(rng.integers(1, 10))
    rows, cols = choose_grid(w, h, n, 448)
    best = min(abs(w / h - c / r) for r in range(1, n + 1) for c in range(1, n // r + 1))
    assert rows * cols <= n and abs(w / h - cols / rows) == best


MODES = ["static", "dynamic", "overlap", "iss"]


@pytest.mark.parametrize("mode", MODES)
def test_num_image_tokens_matches_plans_and_bounds(mode):
  cfg = config("tiny-iss", mode=mode, thumbnail=True)
  rng = np.random.default_rng(1)
  sizes = [(1, 1), (1, 5000), (5000, 1), (56, 56), (57, 56), (200, 100), (100, 200), (300, 200), (90, 30)]
  sizes += [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(40)]
  seen = set()
  for w, h in sizes:
    plan = make_plan(Image.new("RGB", (w, h)), cfg)
    assert plan.num_tokens == num_image_tokens(w, h, cfg) == sum(plan.tile_token_counts), (w, h)
    assert len(plan.tiles) <= max_tiles(cfg) and plan.num_tokens <= max_image_tokens(cfg)
    assert 0 <= plan.patch_index.min() and plan.patch_index.max() < len(plan.tiles) * cfg.vision.num_patches
    seen.add(plan.num_tokens)
  assert max_image_tokens(cfg) in seen  # the bound is reached (by 1x5000)


def patch_means(pixels: np.ndarray, p: int) -> np.ndarray:
  """[H, W, C] -> [H/p, W/p, C] mean of each p x p patch."""
  h, w, c = pixels.shape
  return pixels.reshape(h // p, p, w // p, p, c).astype(np.float64).mean((1, 3))


def unshuffle(tokens: np.ndarray, grid_h: int, grid_w: int, f: int, order: str) -> np.ndarray:
  """Inverse of the pixel shuffle, written from its definition: token (i, j) slot (di, dj) holds patch
  (f*i + di, f*j + dj); row_major enumerates tokens i-outer, column_major j-outer. Each patch exactly once."""
  out = np.full((grid_h, grid_w) + tokens.shape[2:], np.nan)
  hits = np.zeros((grid_h, grid_w), int)
  th, tw = grid_h // f, grid_w // f
  for t, slots in enumerate(tokens):
    i, j = divmod(t, tw) if order == "row_major" else divmod(t, th)[::-1]
    for k, value in enumerate(slots):
      di, dj = divmod(k, f)
      out[f * i + di, f * j + dj] = value
      hits[f * i + di, f * j + dj] += 1
  assert (hits == 1).all(), "some stitched patch is missing or repeated"
  return out


def iss_reference_canvas(image: Image.Image, cfg, grid) -> np.ndarray:
  """The image resized to (cols*core, rows*core) with the tower's resampling, in an m-pixel black frame."""
  rows, cols = grid
  m = cfg.tiling.margin_patches * cfg.vision.patch_size
  core = cfg.vision.image_size - 2 * m
  resized = np.asarray(image.resize((cols * core, rows * core), BICUBIC))
  return np.pad(resized, ((m, m), (m, m), (0, 0)))


@pytest.mark.parametrize("preset, size, order", [("tiny-iss", (200, 150), "row_major"),
                                                 ("tiny-iss", (50, 200), "column_major"),
                                                 ("tiny-iss", (300, 90), "row_major"),
                                                 ("flashvl-2b-dynamic-iss", (900, 800), "row_major")])
def test_iss_stitched_patches_cover_the_image_once(preset, size, order):
  cfg = config(preset, adapter=dict(token_order=order))
  p, g, f, mp = cfg.vision.patch_size, cfg.vision.grid_size, cfg.adapter.shuffle_factor, cfg.tiling.margin_patches
  image = noise_image(*size)
  plan = make_plan(image, cfg)
  rows, cols = plan.grid
  gc = g - 2 * mp
  # "Encoder": mean pixel of each patch of each tile, flattened tile * g*g + patch.
  features = np.concatenate([patch_means(t, p).reshape(g * g, 3) for t in plan.tiles])
  stitched = unshuffle(features[plan.patch_index], rows * gc, cols * gc, f, order)
  canvas = iss_reference_canvas(image, cfg, plan.grid)
  expected = patch_means(canvas, p)[mp:mp + rows * gc, mp:mp + cols * gc]  # the resized image itself
  np.testing.assert_allclose(stitched, expected, atol=1e-9)
  assert len(np.unique(plan.patch_index)) == plan.patch_index.size == rows * cols * gc * gc
  # Tiles are canvas windows at stride core; the outer margin of the framed canvas is black.
  assert (plan.tiles[0, :mp * p] == 0).all() and (plan.tiles[0, :, :mp * p] == 0).all()


def blur_patch_means(tile: jax.Array, p: int) -> jax.Array:
  """A tiny 'tower': 3x3 box blur (zero padding at the border), then the mean of each p x p patch."""
  x = tile.astype(jnp.float32)
  blurred = jax.lax.reduce_window(x, 0.0, jax.lax.add, (3, 3, 1), (1, 1, 1), "SAME") / 9
  h, w, c = x.shape
  return blurred.reshape(h // p, p, w // p, p, c).mean((1, 3))


def iss_blur_mismatch(cfg, image: Image.Image) -> float:
  """Max |stitched per-tile blur - blur of the whole framed image| over the stitched core grid."""
  p, g, f = cfg.vision.patch_size, cfg.vision.grid_size, cfg.adapter.shuffle_factor
  mp = cfg.tiling.margin_patches
  plan = make_plan(image, cfg)
  rows, cols = plan.grid
  gc = g - 2 * mp
  per_tile = jax.vmap(lambda t: blur_patch_means(t, p))(jnp.asarray(plan.tiles))
  features = np.asarray(per_tile).reshape(-1, 3)
  stitched = unshuffle(features[plan.patch_index], rows * gc, cols * gc, f, cfg.adapter.token_order)
  canvas = iss_reference_canvas(image, cfg, plan.grid)
  whole = np.asarray(blur_patch_means(jnp.asarray(canvas), p))[mp:mp + rows * gc, mp:mp + cols * gc]
  return float(np.abs(stitched - whole).max())


@pytest.mark.parametrize("preset, size", [("tiny-iss", (200, 150)), ("tiny-iss", (60, 250)),
                                          ("flashvl-2b-dynamic-iss", (900, 800))])
def test_iss_cores_have_seen_their_neighbours(preset, size):
  """Each kept core equals the whole framed image processed at once: tiles overlap by the margin."""
  cfg = load_config(preset)
  image = noise_image(*size)
  assert iss_blur_mismatch(cfg, image) < 1e-5
  # Control: without a margin the tile borders are the seams, and the blur there differs.
  assert iss_blur_mismatch(config(preset, margin_patches=0), image) > 1.0


def test_dynamic_tiles_are_crops_of_the_resized_image_then_thumbnail():
  cfg = config("tiny-dynamic", mode="dynamic", thumbnail=True)
  s, p, g, f = cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.grid_size, cfg.adapter.shuffle_factor
  image = noise_image(170, 60)
  plan = make_plan(image, cfg)
  rows, cols = plan.grid
  assert (rows, cols) == (1, 3)
  resized = np.asarray(image.resize((cols * s, rows * s), BICUBIC))
  for t in range(rows * cols):
    r, c = divmod(t, cols)
    np.testing.assert_array_equal(plan.tiles[t], resized[r * s:(r + 1) * s, c * s:(c + 1) * s])
  np.testing.assert_array_equal(plan.tiles[-1], np.asarray(image.resize((s, s), BICUBIC)))
  # Each tile's tokens, in tile order, are that tile alone pixel-shuffled.
  features = np.concatenate([patch_means(t, p).reshape(g * g, 3) for t in plan.tiles])
  gathered = features[plan.patch_index]
  start = 0
  for t, count in enumerate(plan.tile_token_counts):
    tile_grid = unshuffle(gathered[start:start + count], g, g, f, cfg.adapter.token_order)
    np.testing.assert_array_equal(tile_grid, patch_means(plan.tiles[t], p))
    start += count


def test_overlap_tiles_share_twice_the_margin_and_keep_every_token():
  cfg = config("tiny-iss", mode="overlap", margin_patches=1)
  s, m = cfg.vision.image_size, cfg.vision.patch_size
  image = noise_image(300, 290)
  plan = make_plan(image, cfg)
  rows, cols = plan.grid
  assert (rows, cols) == (2, 2)
  stride = s - 2 * m
  resized = np.asarray(image.resize(((cols - 1) * stride + s, (rows - 1) * stride + s), BICUBIC))
  tiles = plan.tiles.reshape(rows, cols, s, s, 3)
  for r in range(rows):
    for c in range(cols):
      np.testing.assert_array_equal(tiles[r, c], resized[r * stride:r * stride + s, c * stride:c * stride + s])
  np.testing.assert_array_equal(tiles[0, 0][:, -2 * m:], tiles[0, 1][:, :2 * m])
  np.testing.assert_array_equal(tiles[0, 0][-2 * m:], tiles[1, 0][:2 * m])
  assert sorted(plan.patch_index.ravel()) == list(range(rows * cols * cfg.vision.num_patches))


def test_static_tile_is_the_tower_processor():
  for preset in ["tiny-static", "tiny-iss"]:
    cfg = config(preset, mode="static")
    image = noise_image(123, 45)
    plan = make_plan(image, cfg)
    np.testing.assert_array_equal(plan.tiles[0], resize_for_tower(image, cfg.vision.kind, cfg.vision.image_size))
    assert plan.tile_token_counts == (cfg.tokens_per_tile,)


def test_invalid_margins_are_rejected_with_a_clear_error():
  # 84 / 7 = 12 patches, shuffle 3: a margin of 1 leaves a 10-patch core, not divisible by 3.
  cfg = config("tiny-iss", vision=dict(image_size=84, patch_size=7), adapter=dict(shuffle_factor=3),
               margin_patches=1)
  with pytest.raises(ConfigError, match="core of 12 - 2 \\* 1 = 10 patches is not divisible by "
                     "adapter.shuffle_factor 3"):
    make_plan(noise_image(100, 100), cfg)
  with pytest.raises(ConfigError, match="core"):
    max_image_tokens(cfg)
  with pytest.raises(ConfigError, match="leaves no tile core"):
    num_image_tokens(100, 100, config("tiny-iss", mode="overlap", margin_patches=4))


def test_pad_plan_to_static_shapes():
  cfg = config("tiny-dynamic", mode="dynamic", thumbnail=True)
  for size in [(40, 40), (170, 60)]:
    plan = make_plan(noise_image(*size), cfg)
    padded = pad_plan(plan, cfg)
    n, t, k = max_tiles(cfg), max_image_tokens(cfg), len(plan.tiles)
    assert padded["pixel_values"].shape == (n, cfg.vision.image_size, cfg.vision.image_size, 3)
    assert padded["pixel_values"].dtype == np.uint8 and padded["image_patch_index"].dtype == np.int32
    np.testing.assert_array_equal(padded["pixel_values"][:k], plan.tiles)
    assert not padded["pixel_values"][k:].any()
    np.testing.assert_array_equal(padded["tile_mask"], np.arange(n) < k)
    assert padded["image_patch_index"].shape == (t, 4) and padded["num_image_tokens"] == plan.num_tokens
    np.testing.assert_array_equal(padded["image_patch_index"][:plan.num_tokens], plan.patch_index)
    assert not padded["image_patch_index"][plan.num_tokens:].any()
  with pytest.raises(ValueError, match="another config"):
    pad_plan(plan, config("tiny-dynamic", mode="static"))


@pytest.mark.parametrize("mode", MODES)
def test_non_rgb_tiny_and_elongated_images_give_valid_plans(mode):
  cfg = config("tiny-iss", mode=mode, thumbnail=True)
  one_pixel = noise_image(1, 1)
  images = [one_pixel.convert(m) for m in ["RGB", "L", "P", "RGBA", "CMYK", "1"]]
  images += [Image.fromarray(np.full((h, w), 300, np.uint16)) for w, h in [(1, 1), (1, 5000)]]
  images += [noise_image(5000, 1).convert("P"), noise_image(1, 5000).convert("LA")]
  for img in images:
    w, h = img.size
    plan = make_plan(img, cfg)
    assert plan.tiles.dtype == np.uint8 and plan.tiles.shape[1:] == (56, 56, 3), (mode, img.mode)
    assert plan.num_tokens == num_image_tokens(w, h, cfg) > 0
    assert plan.patch_index.max() < len(plan.tiles) * cfg.vision.num_patches
