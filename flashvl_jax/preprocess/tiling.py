"""How an image becomes vision tiles and image tokens: static, dynamic, overlap and ISS tiling.

Tile size S = vision.image_size, patch p, g = S / p patches per tile side, shuffle factor f, margin
m = tiling.margin_patches * p pixels.
- `static`: the tower's own processor (SigLIP: square resize; AIMv2: short edge + centre crop), one tile.
- `dynamic`: InternVL/MiniCPM-style: a (rows, cols) grid with rows * cols <= max_tiles chosen by aspect
  ratio (`choose_grid`), the image resized to (cols*S, rows*S) and cut into SxS tiles.
- `overlap`: the same grid, tiles overlapping by 2m: resized to ((cols-1)(S-2m)+S, (rows-1)(S-2m)+S) and
  cut at stride S-2m. Every token of every tile is kept.
- `iss` (Implicit Semantic Stitching): resized to (cols*(S-2m), rows*(S-2m)), framed by m black pixels,
  cut at stride S-2m. Each tile keeps its centre (g - 2*margin_patches)^2 patches; the kept cores are
  stitched into one patch grid, which is pixel-shuffled as a whole. Our reading of the paper
  (docs/tiling.md): with 448/14, margin 4 and a 2x2 grid this gives 576 tokens.
`dynamic`, `overlap` and `iss` optionally append a thumbnail (the whole image resized to SxS) when the
grid has more than one tile. Tiles travel as uint8; the model normalises them.

The model stitches and shuffles with one static gather: `TilePlan.patch_index` lists, per image token,
the flat indices `tile * g*g + patch` (patch row-major within its tile) of its f*f source patches, in
`pixel_shuffle_index` channel order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from flashvl_jax.config import ConfigError, FlashVLConfig
from flashvl_jax.preprocess.image import RESAMPLE, resize_for_tower, to_rgb


def pixel_shuffle_index(grid_h: int, grid_w: int, factor: int = 2, order: str = "row_major",
                        offset: int = 0) -> np.ndarray:
  """[grid_h/f * grid_w/f, f*f] int32 indices into a row-major (grid_h, grid_w) patch grid (+ offset)."""
  if grid_h % factor or grid_w % factor:
    raise ValueError(f"patch grid {grid_h}x{grid_w} is not divisible by the shuffle factor {factor}")
  i, j, di, dj = np.meshgrid(np.arange(grid_h // factor), np.arange(grid_w // factor), np.arange(factor),
                             np.arange(factor), indexing="ij")
  idx = (factor * i + di) * grid_w + (factor * j + dj)  # [h', w', f, f]
  if order == "column_major":
    idx = idx.transpose(1, 0, 2, 3)
  elif order != "row_major":
    raise ValueError(f"unknown token order {order!r}; use 'row_major' or 'column_major'")
  return (idx.reshape(-1, factor * factor) + offset).astype(np.int32)


Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end exclusive


@dataclasses.dataclass(frozen=True, eq=False)
class TilePlan:
  """The tiles of one image and how their encoded patches become image tokens."""

  tiles: np.ndarray  # [n_tiles, S, S, 3] uint8, resized / framed, not normalised
  grid: tuple[int, int]  # (rows, cols) of the tile grid; static: (1, 1)
  patch_index: np.ndarray  # [num_tokens, f*f] int32 flat indices tile * g*g + patch
  tile_token_counts: tuple[int, ...]  # tokens per tile (ISS: the stitched grid, then any thumbnail)

  @property
  def num_tokens(self) -> int:
    return int(self.patch_index.shape[0])


@dataclasses.dataclass(frozen=True)
class TileLayout:
  """Where one image's tiles lie on the canvas (the resized image inside its black frame), in pixels."""

  grid: tuple[int, int]  # (rows, cols)
  tile_size: int  # S
  stride: int  # distance between neighbouring tile origins
  frame: int  # black border added around the resized image (ISS: the margin), pixels
  margin: int  # pixels dropped on each side of a tile when its tokens are kept (ISS only; else 0)
  resized: tuple[int, int]  # (width, height) the image is resized to; static: the processor's output
  thumbnail: bool  # a whole-image SxS tile follows the grid tiles

  def tile_boxes(self) -> list[Box]:
    """Grid tiles on the canvas, row-major."""
    rows, cols = self.grid
    s, d = self.tile_size, self.stride
    return [(c * d, r * d, c * d + s, r * d + s) for r in range(rows) for c in range(cols)]

  def kept_boxes(self) -> list[Box]:
    """The part of each grid tile whose tokens are kept (ISS: the core; otherwise the whole tile)."""
    m = self.margin
    return [(x0 + m, y0 + m, x1 - m, y1 - m) for x0, y0, x1, y1 in self.tile_boxes()]


def choose_grid(width: int, height: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
  """(rows, cols) with rows * cols <= max_tiles whose cols/rows is closest to width/height.

  InternVL's `find_closest_aspect_ratio` rule: candidates are visited by increasing tile count; a strictly
  closer aspect ratio wins; on an exact tie, the later (larger) grid wins only if the image area exceeds
  half the area of that grid's tiles, 0.5 * tile_size^2 * rows * cols (so small images do not get upscaled
  into many tiles).
  """
  aspect = width / height
  candidates = sorted(((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)),
                      key=lambda rc: (rc[0] * rc[1], rc[0]))
  best, best_diff = (1, 1), float("inf")
  for rows, cols in candidates:
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (rows, cols), diff
    elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * rows * cols:
      best = (rows, cols)
  return best


def _margin_patches(cfg: FlashVLConfig) -> int:
  """Validated margin in patches for overlap / iss (0 for the other modes)."""
  mode, mp = cfg.tiling.mode, cfg.tiling.margin_patches
  if mode not in ("overlap", "iss"):
    return 0
  g, f = cfg.vision.grid_size, cfg.adapter.shuffle_factor
  if 2 * mp >= g:
    raise ConfigError(f"tiling.margin_patches {mp} leaves no tile core: a tile is {g} patches wide and "
                      f"loses 2 * {mp}; use margin_patches < {(g + 1) // 2}")
  if mode == "iss" and (g - 2 * mp) % f:
    raise ConfigError(f"tiling.margin_patches {mp}: the ISS core of {g} - 2 * {mp} = {g - 2 * mp} patches "
                      f"is not divisible by adapter.shuffle_factor {f}; pick a margin that makes it so")
  return mp


def tile_layout(width: int, height: int, cfg: FlashVLConfig) -> TileLayout:
  """The tiling geometry of a width x height image under `cfg.tiling` (no pixels touched)."""
  mode, s = cfg.tiling.mode, cfg.vision.image_size
  if mode not in ("static", "dynamic", "overlap", "iss"):
    raise ConfigError(f"tiling.mode {mode!r} is not one of 'static', 'dynamic', 'overlap', 'iss'")
  if mode == "static":
    return TileLayout((1, 1), s, s, 0, 0, (s, s), False)
  m = _margin_patches(cfg) * cfg.vision.patch_size
  rows, cols = choose_grid(width, height, cfg.tiling.max_tiles, s)
  stride = s - 2 * m
  frame = m if mode == "iss" else 0
  resized = ((cols - 1) * stride + s - 2 * frame, (rows - 1) * stride + s - 2 * frame)
  thumbnail = cfg.tiling.thumbnail and rows * cols > 1
  return TileLayout((rows, cols), s, stride, frame, frame, resized, thumbnail)


def _tile_token_counts(grid: tuple[int, int], thumbnail: bool, cfg: FlashVLConfig) -> tuple[int, ...]:
  rows, cols = grid
  if cfg.tiling.mode == "iss":
    core = (cfg.vision.grid_size - 2 * _margin_patches(cfg)) // cfg.adapter.shuffle_factor
    counts = [rows * core * cols * core]
  else:
    counts = [cfg.tokens_per_tile] * (rows * cols)
  return tuple(counts + [cfg.tokens_per_tile] * thumbnail)


def _patch_index(layout: TileLayout, cfg: FlashVLConfig) -> np.ndarray:
  g, f, order = cfg.vision.grid_size, cfg.adapter.shuffle_factor, cfg.adapter.token_order
  rows, cols = layout.grid
  n_grid = rows * cols
  if cfg.tiling.mode == "iss":
    mp = cfg.tiling.margin_patches
    gc = g - 2 * mp
    stitched = pixel_shuffle_index(rows * gc, cols * gc, f, order)  # into the stitched core grid
    r, c = np.divmod(stitched, cols * gc)
    tile = (r // gc) * cols + c // gc
    parts = [tile * g * g + (r % gc + mp) * g + (c % gc + mp)]
  else:
    parts = [pixel_shuffle_index(g, g, f, order, offset=t * g * g) for t in range(n_grid)]
  if layout.thumbnail:
    parts.append(pixel_shuffle_index(g, g, f, order, offset=n_grid * g * g))
  return np.concatenate(parts).astype(np.int32)


def make_plan(image: Image.Image, cfg: FlashVLConfig) -> TilePlan:
  """Tiles one image (any PIL mode) under `cfg.tiling` with the tower's resampling."""
  image = to_rgb(image)
  layout = tile_layout(*image.size, cfg)
  kind, s = cfg.vision.kind, cfg.vision.image_size
  if cfg.tiling.mode == "static":
    tiles = [resize_for_tower(image, kind, s)]
  else:
    canvas = np.asarray(image.resize(layout.resized, RESAMPLE[kind]))
    canvas = np.pad(canvas, ((layout.frame, layout.frame), (layout.frame, layout.frame), (0, 0)))
    tiles = [canvas[y0:y1, x0:x1] for x0, y0, x1, y1 in layout.tile_boxes()]
    if layout.thumbnail:
      tiles.append(np.asarray(image.resize((s, s), RESAMPLE[kind])))
  return TilePlan(np.stack(tiles), layout.grid, _patch_index(layout, cfg),
                  _tile_token_counts(layout.grid, layout.thumbnail, cfg))


def num_image_tokens(width: int, height: int, cfg: FlashVLConfig) -> int:
  """Image tokens of a width x height image, without building tiles (equals `make_plan(...).num_tokens`)."""
  layout = tile_layout(width, height, cfg)
  return sum(_tile_token_counts(layout.grid, layout.thumbnail, cfg))


def max_tiles(cfg: FlashVLConfig) -> int:
  """The most tiles any image can produce (fixed tile dimension of a batch)."""
  if cfg.tiling.mode == "static":
    return 1
  n = cfg.tiling.max_tiles
  return n + int(cfg.tiling.thumbnail and n > 1)


def max_image_tokens(cfg: FlashVLConfig) -> int:
  """The most image tokens any image can produce (fixed token dimension of a batch)."""
  n = 1 if cfg.tiling.mode == "static" else cfg.tiling.max_tiles
  # Counts grow with rows * cols, and a wide enough image gets the 1 x n grid, so the bound is reached.
  grids = [(r, c) for r in range(1, n + 1) for c in range(1, n // r + 1)]
  return max(sum(_tile_token_counts(g, cfg.tiling.thumbnail and g[0] * g[1] > 1, cfg)) for g in grids)


def pad_plan(plan: TilePlan, cfg: FlashVLConfig) -> dict[str, np.ndarray | int]:
  """The plan padded to the static batch shapes `max_tiles(cfg)` and `max_image_tokens(cfg)`.

  Returns pixel_values [max_tiles, S, S, 3] uint8 (zero tiles after the real ones), tile_mask
  [max_tiles] bool, image_patch_index [max_image_tokens, f*f] int32 (padding rows 0) and
  num_image_tokens.
  """
  n_tiles, n_tokens = max_tiles(cfg), max_image_tokens(cfg)
  if len(plan.tiles) > n_tiles or plan.num_tokens > n_tokens:
    raise ValueError(f"plan has {len(plan.tiles)} tiles / {plan.num_tokens} tokens, more than the config's "
                     f"{n_tiles} / {n_tokens}; was it made with another config?")
  pixel_values = np.zeros((n_tiles,) + plan.tiles.shape[1:], np.uint8)
  pixel_values[:len(plan.tiles)] = plan.tiles
  patch_index = np.zeros((n_tokens, plan.patch_index.shape[1]), np.int32)
  patch_index[:plan.num_tokens] = plan.patch_index
  return dict(pixel_values=pixel_values, tile_mask=np.arange(n_tiles) < len(plan.tiles),
              image_patch_index=patch_index, num_image_tokens=plan.num_tokens)
