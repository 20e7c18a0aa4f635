"""Bad input never crashes the pipeline or corrupts a batch: it is skipped and counted, or fails by name.

Every file is made here in a tmp dir. Odd-but-valid inputs (non-RGB modes, EXIF rotation, 1x1 and 1x5000
images) must come through converted; broken ones must be skipped with their id and reason.
"""

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flashvl_jax.config import load_config
from flashvl_jax.data.pipeline import SkipStats, make_dataset
from flashvl_jax.data.sources import BadSampleError, JsonSource
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer

QA = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture(scope="module")
def static_processor():
  # tiny-static: SigLIP-style square resize to one 64 px tile, so pixels are easy to predict.
  return Processor(load_config("tiny-static"), load_tokenizer("qwen2.5"), max_length=96)


def _png(image):
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def _png_bomb(side=100_000):
  """A valid PNG header claiming side x side pixels (PIL refuses it as a decompression bomb on open)."""
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _cases(tmp_path):
  """(good JSONL lines, {case: (JSONL line, expected skip kind)}); the image files they name are written."""
  (tmp_path / "red.png").write_bytes(_png(Image.new("RGB", (32, 32), (255, 0, 0))))
  good = [json.dumps({"id": f"good{i}", "image": "red.png", "conversations": QA}) for i in range(3)]
  png = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
  files = {"corrupt": b"this is not an image at all" * 10, "truncated": png[:len(png) // 2], "empty": b"",
           "bomb": _png_bomb(), "missing": None}
  cases = {}
  for case, data in files.items():
    if data is not None:
      (tmp_path / f"{case}.png").write_bytes(data)
    cases[case] = (json.dumps({"id": case, "image": f"{case}.png", "conversations": QA}), "bad_image")
  long_question = [{"from": "human", "value": "why " * 500}, {"from": "gpt", "value": "because"}]
  cases.update(
      malformed_json=('{"id": "cut", "conversations": [', "bad_record"),
      no_answer=(json.dumps({"id": "no_answer", "image": "red.png", "conversations": QA[:1]}), "bad_record"),
      too_long=(json.dumps({"id": "too_long", "conversations": long_question}), "too_long"),
      assistant_first=(json.dumps({"id": "assistant_first", "conversations": QA[::-1]}), "bad_record"),
  )
  return good, cases


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_bad_samples_are_skipped_logged_and_counted_without_changing_batches(tmp_path, static_processor, caplog):
  good, cases = _cases(tmp_path)
  lines = good + [line for line, _ in cases.values()]
  path = _write_jsonl(tmp_path / "data.jsonl", lines)
  malformed_id = f"data.jsonl:{lines.index(cases['malformed_json'][0]) + 1}"  # no id: file and line number
  expected = {(malformed_id if case == "malformed_json" else case): error for case, (_, error) in cases.items()}
  stats = SkipStats()
  with caplog.at_level(logging.WARNING, logger="flashvl_jax.data.pipeline"):
    batches = list(make_dataset(JsonSource(path), static_processor, batch_size=1, shuffle=False, num_threads=2,
                                shard_index=0, shard_count=1, skip_stats=stats))
  assert len(batches) == len(good)  # every good sample, nothing else
  for batch in batches:
    assert batch["input_ids"].shape == (1, 96) and batch["loss_mask"].sum() > 0
    assert batch["tile_mask"].all() and (batch["pixel_values"] == [255, 0, 0]).all()
  assert stats.total == len(expected) and stats.reasons.keys() == expected.keys()
  assert stats.counts == {e: list(expected.values()).count(e) for e in set(expected.values())}
  reasons = stats.reasons
  assert "no assistant turn" in reasons["no_answer"] and "max_length is 96" in reasons["too_long"]
  assert "too large" in reasons["bomb"] and "does not exist" in reasons["missing"]
  assert "is empty" in reasons["empty"] and "truncated" in reasons["truncated"]
  assert "not a readable image" in reasons["corrupt"] and "malformed JSON" in reasons[malformed_id]
  assert "'assistant' but 'user' was expected" in reasons["assistant_first"]
  for sample_id in expected:
    assert any(sample_id in record.getMessage() for record in caplog.records), sample_id


@pytest.mark.parametrize("case", ["corrupt", "truncated", "empty", "bomb", "missing", "malformed_json", "no_answer",
                                  "too_long", "assistant_first"])
def test_fail_policy_raises_naming_the_sample(tmp_path, static_processor, case):
  good, cases = _cases(tmp_path)
  path = _write_jsonl(tmp_path / "data.jsonl", [good[0], cases[case][0]])
  sample_id = "data.jsonl:2" if case == "malformed_json" else case
  it = iter(make_dataset(JsonSource(path), static_processor, batch_size=1, shuffle=False, num_threads=0,
                         shard_index=0, shard_count=1, bad_sample_policy="fail"))
  next(it)  # the good record
  with pytest.raises(BadSampleError, match=f"'{sample_id}'.*bad_sample_policy='skip'"):
    next(it)


def _encode_images(processor, images):
  records = [{"id": str(i), "image": image, "messages": [{"role": "user", "content": "Colour?"},
                                                          {"role": "assistant", "content": "x"}]}
             for i, image in enumerate(images)]
  stats = SkipStats()
  batches = list(make_dataset(records, processor, batch_size=1, shuffle=False, num_threads=0, shard_index=0,
                              shard_count=1, skip_stats=stats, bad_sample_policy="fail"))
  assert stats.total == 0 and len(batches) == len(images)
  return [b["pixel_values"][0, 0] for b in batches]  # the first tile


def test_non_rgb_modes_are_converted(static_processor):
  palette = Image.new("P", (8, 8), 1)
  palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
  cmyk = io.BytesIO()
  Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(cmyk, format="TIFF")
  images = {
      "L": (_png(Image.new("L", (8, 8), 77)), (77, 77, 77)),
      "LA": (_png(Image.new("LA", (8, 8), (77, 0))), (255, 255, 255)),  # transparent -> white
      "P": (_png(palette), (10, 200, 30)),
      "RGBA": (_png(Image.new("RGBA", (8, 8), (10, 20, 30, 255))), (10, 20, 30)),
      "CMYK": (cmyk.getvalue(), (255, 0, 255)),
      "I;16": (_png(Image.new("I;16", (8, 8), 25700)), (100, 100, 100)),  # 16-bit samples: 25700 / 257
  }
  for mode, (data, _) in images.items():
    assert Image.open(io.BytesIO(data)).mode == mode
  tiles = _encode_images(static_processor, [data for data, _ in images.values()])
  for (mode, (_, rgb)), tile in zip(images.items(), tiles):
    assert (tile == rgb).all(), mode


def test_exif_orientation_is_applied(static_processor):
  image = Image.new("RGB", (40, 20), (0, 0, 255))
  image.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left half, blue right half
  exif = Image.Exif()
  exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red on top
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=95, exif=exif)
  (tile,) = _encode_images(static_processor, [buf.getvalue()])
  top, bottom = tile[4:28].reshape(-1, 3).mean(0), tile[36:60].reshape(-1, 3).mean(0)
  assert top[0] > 200 and top[2] < 60, top
  assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("mode", ["static", "dynamic", "overlap", "iss"])
def test_degenerate_sizes_tile_without_error(mode):
  processor = Processor(load_config("tiny-iss", [f"tiling.mode={mode}"]), load_tokenizer("qwen2.5"), max_length=96)
  tiny, strip = Image.new("RGB", (1, 1), (0, 255, 0)), Image.new("RGB", (1, 5000), (0, 255, 0))
  tiles = _encode_images(processor, [_png(tiny), _png(strip)])
  assert all(tile.mean(axis=(0, 1))[1] > 100 for tile in tiles)
