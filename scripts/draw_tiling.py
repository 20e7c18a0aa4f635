"""Draws how each tiling mode cuts one synthetic picture, for docs/tiling.md.

Writes docs/images/tiling_<mode>.png for static, dynamic, overlap and iss, and tiling_all.png with all four.
Geometry comes from `flashvl_jax.preprocess.tiling` (AIMv2-448/14 preset, margin 4 patches, <= 4 tiles).

  python scripts/draw_tiling.py [--out docs/images] [--preset flashvl-2b-dynamic-iss]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flashvl_jax.config import FlashVLConfig, load_config
from flashvl_jax.preprocess.image import RESAMPLE, processor_kind
from flashvl_jax.preprocess.tiling import TilePlan, make_plan, tile_layout

MODES = ("static", "dynamic", "overlap", "iss")
TILE_COLORS = [(235, 64, 52), (30, 144, 255), (255, 176, 0), (46, 180, 90), (160, 90, 220)]
CANVAS_VIEW = 400  # longest side of the drawn canvas, pixels
TILE_VIEW = 128  # side of each drawn tile
PAD = 16


def font(size: int) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


def example_picture(width: int = 800, height: int = 600) -> Image.Image:
  """A synthetic landscape: sky gradient, sun, hills, a house and a sign (no downloads)."""
  y = np.linspace(0, 1, height)[:, None, None]
  sky = (1 - y) * np.array([90, 160, 235]) + y * np.array([200, 230, 255])
  img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
  d = ImageDraw.Draw(img)
  d.ellipse((600, 60, 720, 180), fill=(255, 210, 60))
  d.polygon([(0, 420), (220, 300), (470, 430), (800, 330), (800, 600), (0, 600)], fill=(70, 150, 70))
  d.rectangle((300, 380, 470, 520), fill=(190, 90, 60))
  d.polygon([(285, 380), (385, 300), (485, 380)], fill=(120, 50, 40))
  d.rectangle((365, 450, 405, 520), fill=(80, 50, 30))
  for x0 in (315, 420):
    d.rectangle((x0, 400, x0 + 35, 435), fill=(250, 240, 180))
  d.rectangle((40, 470, 250, 540), fill=(245, 245, 245), outline=(40, 40, 40), width=3)
  d.text((145, 505), "Flash-VL", fill=(20, 20, 20), font=font(40), anchor="mm")
  return img


def dashed_rectangle(d: ImageDraw.ImageDraw, box, color, width: int = 2, dash: int = 7) -> None:
  x0, y0, x1, y1 = box
  for a, b, horizontal, fixed in [(x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)]:
    for s in np.arange(a, b, 2 * dash):
      e = min(s + dash, b)
      d.line([(s, fixed), (e, fixed)] if horizontal else [(fixed, s), (fixed, e)], fill=color, width=width)


def describe(mode: str, cfg: FlashVLConfig, plan: TilePlan, image: Image.Image) -> list[str]:
  lay = tile_layout(*image.size, cfg)
  s, p, f = cfg.vision.image_size, cfg.vision.patch_size, cfg.adapter.shuffle_factor
  rows, cols = lay.grid
  head = f"{mode}: {image.width}x{image.height} image, grid {rows}x{cols}, {len(plan.tiles)} tile(s) of {s} px"
  if mode == "static":
    how = (f"resize to {s}x{s} (bilinear)" if processor_kind(cfg.vision.kind) == "siglip" else
           f"short edge -> {s} (bicubic), centre crop {s}x{s}")
    body = [f"{cfg.vision.kind} tower's processor: {how}",
            f"{s // p}x{s // p} patches, pixel shuffle {f}x{f} -> {plan.num_tokens} tokens"]
  elif mode in ("dynamic", "overlap"):
    overlap = s - lay.stride
    body = [f"resized to {lay.resized[0]}x{lay.resized[1]}, tiles at stride {lay.stride} px"
            + (f" (neighbours overlap {overlap} px)" if overlap else ""),
            f"each tile shuffled alone: {cfg.tokens_per_tile} tokens/tile"
            + (" + thumbnail" if lay.thumbnail else "") + f" = {plan.num_tokens} tokens"]
  else:
    gc = (s - 2 * lay.margin) // p
    body = [f"resized to {lay.resized[0]}x{lay.resized[1]}, {lay.frame} px black frame, stride {lay.stride} px "
            f"(overlap {s - lay.stride} px)",
            f"keep each tile's {gc}x{gc}-patch core (dashed), stitch {rows * gc}x{cols * gc} patches, "
            f"shuffle -> {plan.num_tokens} tokens"]
  return [head] + body


def draw_canvas(mode: str, cfg: FlashVLConfig, image: Image.Image) -> Image.Image:
  """The pixels the tiles are cut from, with tile outlines, overlaps and (ISS) kept cores."""
  lay = tile_layout(*image.size, cfg)
  if mode == "static":  # the original image and what the processor keeps (CLIP: the centre square)
    w, h = image.size
    side = min(w, h)
    box = (0, 0, w, h) if processor_kind(cfg.vision.kind) == "siglip" else (
        (w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
    base, boxes, kept = image, [box], []
  else:
    resized = np.asarray(image.resize(lay.resized, RESAMPLE[cfg.vision.kind]))
    framed = np.pad(resized, ((lay.frame, lay.frame), (lay.frame, lay.frame), (0, 0)))
    base, boxes = Image.fromarray(framed), lay.tile_boxes()
    kept = lay.kept_boxes() if lay.margin else []
  scale = CANVAS_VIEW / max(base.size)
  view = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.BILINEAR)
  sc = lambda box: tuple(round(v * scale) for v in box)
  overlay = Image.new("RGBA", view.size, (0, 0, 0, 0))
  od = ImageDraw.Draw(overlay)
  for i, a in enumerate(boxes):  # tint regions covered by two or more tiles
    for b in boxes[i + 1:]:
      inter = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
      if inter[0] < inter[2] and inter[1] < inter[3]:
        od.rectangle(sc(inter), fill=(255, 255, 255, 80))
  view = Image.alpha_composite(view.convert("RGBA"), overlay).convert("RGB")
  d = ImageDraw.Draw(view)
  for i, box in enumerate(boxes):
    inset = 2 * (i % 2)  # keep coincident edges of neighbouring tiles apart
    x0, y0, x1, y1 = sc(box)
    d.rectangle((x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset), outline=TILE_COLORS[i], width=3)
  for i, box in enumerate(kept):
    dashed_rectangle(d, sc(box), TILE_COLORS[i], width=2)
  if lay.frame:
    d.text((4, 2), f"black frame {lay.frame} px", fill=(255, 255, 255), font=font(12))
  return view


def draw_tiles(mode: str, cfg: FlashVLConfig, plan: TilePlan, image: Image.Image) -> Image.Image:
  """The cut tiles, coloured like their outlines; ISS cores dashed; the thumbnail last."""
  lay = tile_layout(*image.size, cfg)
  rows, cols = lay.grid
  n_grid = rows * cols
  cells = [(i // cols, i % cols) for i in range(n_grid)] + [(rows, 0)] * lay.thumbnail
  step = TILE_VIEW + 8
  out = Image.new("RGB", (cols * step, (rows + lay.thumbnail) * step + 16 * lay.thumbnail), "white")
  d = ImageDraw.Draw(out)
  scale = TILE_VIEW / cfg.vision.image_size
  for i, (tile, (r, c)) in enumerate(zip(plan.tiles, cells)):
    x, y = c * step, r * step + 16 * (r == rows)
    out.paste(Image.fromarray(tile).resize((TILE_VIEW, TILE_VIEW), Image.Resampling.BILINEAR), (x, y))
    color = TILE_COLORS[i] if i < n_grid else (90, 90, 90)
    d.rectangle((x, y, x + TILE_VIEW - 1, y + TILE_VIEW - 1), outline=color, width=3)
    if mode == "iss" and i < n_grid:
      m = round(lay.margin * scale)
      dashed_rectangle(d, (x + m, y + m, x + TILE_VIEW - 1 - m, y + TILE_VIEW - 1 - m), color, width=2, dash=5)
    if i == n_grid:
      d.text((x, y - 15), "thumbnail", fill=(60, 60, 60), font=font(12))
  return out


def draw_mode(mode: str, cfg: FlashVLConfig, image: Image.Image) -> Image.Image:
  plan = make_plan(image, cfg)
  lines = describe(mode, cfg, plan, image)
  canvas, tiles = draw_canvas(mode, cfg, image), draw_tiles(mode, cfg, plan, image)
  text_h = 24 + 18 * (len(lines) - 1)
  width = max(canvas.width + tiles.width + 3 * PAD, 760)
  height = text_h + max(canvas.height, tiles.height) + 3 * PAD
  panel = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(panel)
  d.text((PAD, PAD), lines[0], fill=(0, 0, 0), font=font(18))
  for k, line in enumerate(lines[1:]):
    d.text((PAD, PAD + 24 + 18 * k), line, fill=(60, 60, 60), font=font(14))
  top = 2 * PAD + text_h
  panel.paste(canvas, (PAD, top))
  panel.paste(tiles, (2 * PAD + canvas.width, top))
  return panel


def mode_config(base: FlashVLConfig, mode: str) -> FlashVLConfig:
  """`base` with tiling `mode`; dynamic and overlap get a thumbnail like the Dynamic preset."""
  tiling = dataclasses.replace(base.tiling, mode=mode, thumbnail=mode in ("dynamic", "overlap"))
  return dataclasses.replace(base, tiling=tiling)


def save_small(img: Image.Image, path: pathlib.Path) -> None:
  img.quantize(96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
  print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="docs/images", help="output folder")
  parser.add_argument("--preset", default="flashvl-2b-dynamic-iss", help="model preset giving tile/patch/margin")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  base, image = load_config(args.preset), example_picture()
  panels = {mode: draw_mode(mode, mode_config(base, mode), image) for mode in MODES}
  for mode, panel in panels.items():
    save_small(panel, out / f"tiling_{mode}.png")
  width = max(p.width for p in panels.values())
  pairs = [MODES[:2], MODES[2:]]
  heights = [max(panels[m].height for m in pair) for pair in pairs]
  combined = Image.new("RGB", (2 * width, sum(heights)), "white")
  for (left, right), y in zip(pairs, [0, heights[0]]):
    combined.paste(panels[left], (0, y))
    combined.paste(panels[right], (width, y))
  save_small(combined, out / "tiling_all.png")


if __name__ == "__main__":
  main()
