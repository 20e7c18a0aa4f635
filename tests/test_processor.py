"""Processor: fixed shapes and dtypes per tiling mode, image placeholders, loss masks, length limits."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from flashvl_jax.config import load_config
from flashvl_jax.preprocess import tiling
from flashvl_jax.preprocess.processor import Processor, PromptTooLongError
from flashvl_jax.preprocess.tokenizer import load_tokenizer

QUESTION = [{"role": "user", "content": "What colour is the square?"}]
DIALOGUE = [
    {"role": "user", "content": "What colour is the square?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": "Top left, near the edge."},
]
IM_START, IM_END, PAD, ASSISTANT, NEWLINE = 151644, 151645, 151643, 77091, 198


def noise_image(width, height, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("qwen2.5")


def placeholder_count(ids):
  return int(np.sum(ids == -200) + np.sum(ids == -201))


# (preset, tiles of a 2:1 image, image tokens of a 2:1 image, max tiles, max image tokens), all from the geometry:
# static: one 64/8 tile -> 8x8 patches -> 4x4 = 16 tokens; dynamic: 56/7 tiles of 4x4 = 16 tokens, 2:1 -> 1x2 grid
# + thumbnail = 3 tiles, at most 4 + thumbnail; iss: margin 1 -> 6x6 core patches, 1x2 grid -> 6x12 patches -> 18
# tokens, at most 36 (2x2 -> 12x12 -> 36).
TINY = [("tiny-static", 1, 16, 1, 16), ("tiny-dynamic", 3, 48, 5, 80), ("tiny-iss", 2, 18, 4, 36)]


@pytest.mark.parametrize("preset, tiles, tokens, max_tiles, max_tokens", TINY)
def test_shapes_dtypes_and_placeholders(tok, preset, tiles, tokens, max_tiles, max_tokens):
  cfg = load_config(preset)
  processor = Processor.from_preset(preset, tok, max_length=160)
  s = cfg.vision.image_size
  image = noise_image(112, 56)
  batch = processor([image, None], [DIALOGUE, QUESTION])
  expected = {
      "input_ids": ((2, 160), np.int32),
      "attention_mask": ((2, 160), np.int32),
      "loss_mask": ((2, 160), np.int32),
      "pixel_values": ((2, max_tiles, s, s, 3), np.uint8),
      "tile_mask": ((2, max_tiles), np.bool_),
      "image_patch_index": ((2, max_tokens, 4), np.int32),
      "num_image_tokens": ((2,), np.int32),
  }
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["num_image_tokens"].tolist() == [tokens, 0]
  assert processor.num_image_tokens((112, 56)) == tokens
  assert placeholder_count(batch["input_ids"][0]) == tokens and np.sum(batch["input_ids"][0] == -200) == 1
  assert batch["tile_mask"][0].tolist() == [True] * tiles + [False] * (max_tiles - tiles)
  np.testing.assert_array_equal(batch["pixel_values"][0, :tiles], tiling.make_plan(image, cfg).tiles)
  assert not batch["pixel_values"][0, tiles:].any()
  # The text-only row: no placeholders, no pixels, no tiles.
  assert placeholder_count(batch["input_ids"][1]) == 0
  assert not batch["pixel_values"][1].any() and not batch["tile_mask"][1].any()
  assert not batch["image_patch_index"][1].any()


@pytest.mark.parametrize("preset, size, tokens", [
    ("flashvl-2b-static", (640, 480), 256),  # 32x32 SigLIP patches shuffled 2x2
    ("flashvl-2b-dynamic-iss", (1000, 1000), 576),  # the paper's ISS count: 2x2 tiles of 24x24 cores -> 48x48 / 4
    ("flashvl-2b-dynamic", (900, 450), 768),  # 1x2 grid + thumbnail, 256 each
])
def test_full_size_token_counts(tok, preset, size, tokens):
  processor = Processor.from_preset(preset, tok, max_length=1024)
  assert processor.num_image_tokens(size) == tokens
  example = processor.encode_example(noise_image(*size), QUESTION, add_generation_prompt=True)
  assert example["num_image_tokens"] == tokens == placeholder_count(example["input_ids"])


def test_placeholder_count_follows_aspect_ratio(tok):
  processor = Processor.from_preset("tiny-dynamic", tok, max_length=160)
  for size in [(56, 56), (300, 60), (60, 300), (200, 100), (30, 20)]:
    example = processor.encode_example(noise_image(*size), QUESTION)
    n = processor.num_image_tokens(size)
    assert example["num_image_tokens"] == n == placeholder_count(example["input_ids"])
    assert example["tile_mask"].sum() * 16 == n  # 16 tokens per dynamic tile


def test_loss_mask_only_on_assistant_answers(tok):
  processor = Processor.from_preset("tiny-static", tok, max_length=160)
  example = processor.encode_example(noise_image(64, 64), DIALOGUE)
  ids, mask = example["input_ids"], example["loss_mask"]
  assert tok.encode("Red.<|im_end|>Top left, near the edge.<|im_end|>", special_tokens=True) == ids[mask == 1].tolist()
  n = int(example["attention_mask"].sum())
  assert example["attention_mask"].tolist() == [1] * n + [0] * (160 - n)
  assert (ids[n:] == PAD).all() and not mask[n:].any()
  # Each answer starts right after "<|im_start|>assistant\n".
  starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
  assert [ids[i - 3:i].tolist() for i in starts] == [[IM_START, ASSISTANT, NEWLINE]] * 2


def test_generation_prompt_and_batch_equals_examples(tok):
  processor = Processor.from_preset("tiny-iss", tok, max_length=128)
  images, conversations = [noise_image(90, 60, 1), None], [QUESTION, QUESTION]
  batch = processor(images, conversations, add_generation_prompt=True)
  for row, (image, messages) in enumerate(zip(images, conversations)):
    example = processor.encode_example(image, messages, add_generation_prompt=True)
    for key, value in example.items():
      np.testing.assert_array_equal(batch[key][row], value, err_msg=key)
    n = int(example["attention_mask"].sum())
    assert example["input_ids"][n - 3:n].tolist() == [IM_START, ASSISTANT, NEWLINE]
    assert not example["loss_mask"].any()


def test_slice_markers_wrap_each_tile(tok):
  cfg = load_config("tiny-dynamic")
  cfg = dataclasses.replace(cfg, tiling=dataclasses.replace(cfg.tiling, slice_markers=True))
  processor = Processor.from_preset(cfg, tok, max_length=200)
  example = processor.encode_example(noise_image(112, 56), QUESTION)  # 1x2 grid + thumbnail: 3 tiles of 16
  ids = example["input_ids"].tolist()
  start = ids.index(151652)  # <|vision_start|>
  tile = lambda first: [151652, first] + [-201] * 15 + [151653]
  assert ids[start:start + 54] == tile(-200) + tile(-201) + tile(-201)
  assert ids.count(151652) == ids.count(151653) == 3 and example["num_image_tokens"] == 48
  with pytest.raises(ValueError, match="slice marker tokens"):
    Processor(cfg, tok, slice_marker_tokens=("[PLACEHOLDER_0]", "[PLACEHOLDER_1]"))


def test_overlong_prompt_raises_with_lengths(tok):
  processor = Processor.from_preset("tiny-static", tok, max_length=160)
  n = int(processor.encode_example(noise_image(64, 64), DIALOGUE)["attention_mask"].sum())
  short = Processor.from_preset("tiny-static", tok, max_length=40)
  with pytest.raises(PromptTooLongError, match=rf"has {n} tokens \(16 in the image block\) but max_length is 40"):
    short.encode_example(noise_image(64, 64), DIALOGUE)


def test_truncate_drops_leftmost_text_never_the_image(tok):
  full = Processor.from_preset("tiny-static", tok, max_length=160, system_prompt=None)
  ids = full.encode_example(noise_image(64, 64), DIALOGUE)["input_ids"]
  n = int((ids != PAD).sum())
  # Without a system turn the prompt opens "<|im_start|>user\n" (3 tokens), then the 16 image tokens.
  assert ids[:3].tolist() == [IM_START, 872, NEWLINE] and placeholder_count(ids[3:19]) == 16
  cut = Processor.from_preset("tiny-static", tok, max_length=n - 5, system_prompt=None, truncate=True)
  example = cut.encode_example(noise_image(64, 64), DIALOGUE)
  # 5 text tokens go: the 3 before the image block, then the first 2 after it.
  expected = np.concatenate([ids[3:19], ids[21:n]])
  np.testing.assert_array_equal(example["input_ids"], expected)
  assert example["attention_mask"].all()
  with pytest.raises(PromptTooLongError, match="16 in the image block"):
    Processor.from_preset("tiny-static", tok, max_length=12, truncate=True).encode_example(noise_image(64, 64),
                                                                                           QUESTION)


def test_input_errors(tok):
  processor = Processor.from_preset("tiny-static", tok, max_length=64)
  with pytest.raises(ValueError, match="one image \\(or None\\) per conversation"):
    processor([None], [QUESTION, QUESTION])
  with pytest.raises(ValueError, match="no image was given"):
    processor.encode_example(None, [{"role": "user", "content": "<image>\nWhat is it?"}])
