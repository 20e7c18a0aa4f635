"""A directory in which the commands and snippets of README.md and docs/ run as written (tests/test_docs.py).

Every checkpoint the docs use and do not make themselves exists here as a tiny random stand-in of the same kind
(a released Flash-VL, SigLIP, AIMv2, Qwen2, an Orbax Flash-VL), every data file as a few LLaVA-style records with
images (question/answer rows as parquet shards in `vqa/` and as the TFDS dataset `my_vqa`), every benchmark file
as a few generated items, and `cat.jpg` / `cat.png` as a generated picture.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

from convert.random_cmd import write_random
from flashvl_jax.testing.benchmark_files import write_choice_tsv, write_ocr_tsv
from flashvl_jax.testing.stored_datasets import qa_rows, write_parquet, write_tfds
from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2, tiny_qwen2_config
from flashvl_jax.testing.tiny_vision import build_tiny_aimv2, build_tiny_siglip

QWEN_VOCABULARY = 151_936  # the real tokenizer's ids must fit a model trained from an assembled checkpoint
CONVERSATION_FILES = ("pretrain.jsonl", "sft.jsonl", "sft_a.jsonl", "sft_b.jsonl", "sft_c.jsonl", "reasoning.jsonl",
                      "reason.jsonl", "problems.jsonl", "DATA.jsonl", "x.jsonl")
PREFERENCE_FILES = ("pairs.jsonl",)
TFDS_DATA_DIR = "tensorflow_datasets"  # the commands find it through $TFDS_DATA_DIR


def write_images(root: pathlib.Path, count: int) -> list[str]:
  rng = np.random.default_rng(0)
  names = []
  for i in range(count):
    names.append(f"images/{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / names[-1])
  return names


def write_data(root: pathlib.Path, records: int = 8) -> None:
  (root / "images").mkdir(exist_ok=True)
  images = write_images(root, records)
  colours = ("red", "blue", "green", "yellow")
  conversations = [{"id": f"c{i}", "image": image, "conversations": [
      {"from": "human", "value": "<image>\nWhich colour is it?"}, {"from": "gpt", "value": colours[i % 4]}]}
      for i, image in enumerate(images)]
  pairs = [{"id": f"p{i}", "image": image, "prompt": "<image>\nWhich colour is it?", "chosen": colours[i % 4],
            "rejected": colours[(i + 1) % 4]} for i, image in enumerate(images)]
  for name in CONVERSATION_FILES:
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in conversations))
  for name in PREFERENCE_FILES:
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in pairs))


def build_docs_workdir(root: str | pathlib.Path) -> pathlib.Path:
  from transformers import Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  write_random("tiny-iss", root / "ckpt" / "flashvl-2b-dynamic-iss", progress=False)
  write_random("tiny-static", root / "FlashVL-2B-Static", hf=True, progress=False)
  # the real towers' input sizes, so that the snippets' pixel shapes are the ones a user passes
  build_tiny_siglip(root / "siglip2-so400m-patch16-512", seed=1, full_model=True, image_size=512, patch_size=16)
  build_tiny_aimv2(root / "aimv2-huge-patch14-448", seed=2, image_size=448, patch_size=14)
  build_tiny_qwen2(root / "Qwen2-1.5B-Instruct", seed=3)
  Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=QWEN_VOCABULARY)).save_pretrained(root / "Qwen2.5-1.5B-Instruct")
  picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
  picture.save(root / "cat.jpg")
  picture.save(root / "cat.png")
  write_data(root)
  rows = qa_rows(8)
  write_parquet(rows, root / "vqa")
  write_tfds({"train": rows, "test": qa_rows(4, split="eval")}, root / TFDS_DATA_DIR, name="my_vqa")
  for name in ("MMBench_DEV_EN.tsv", "AI2D_TEST.tsv"):
    write_choice_tsv(root / name, count=4)
  write_ocr_tsv(root / "OCRBench.tsv", count=2)
  return root
