"""A synthetic visual-question dataset: coloured shapes, positions, counts and rendered words.

Each sample is a pure function of (seed, split, index), so the dataset is random access, sized, and
identical on every host and in every worker. Train and eval draw from disjoint index ranges. Answers
are single words from a small closed set per question type, and shapes are large and saturated, so a
tiny model that sees a few low-resolution tiles can learn them in minutes:

| question type | question | answers |
|---|---|---|
| colour | What colour is the circle? | red, green, blue, yellow, purple |
| count | How many squares are there? | 1 ... max_count |
| position | Where is the red shape? | left, right, top, bottom |
| word | Which word is written? | `words` (distinct lengths by default) |

Shapes sit in the cells of a 3x3 grid (with jitter); `difficulty="hard"` adds distractor shapes, smaller
shapes, tinted backgrounds and off-centre words. Views over the same generator: `SyntheticPreferences`
(DPO pairs: chosen = the answer, rejected = another answer of the same type) and `SyntheticPrompts`
(prompt + answer for GRPO, scored by `counting_reward` on count questions).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flashvl_jax.config import ConfigError

COLOURS = {
    "red": (230, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 40, 255),
    "yellow": (255, 220, 0),
    "purple": (150, 0, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1)}  # (row, col) in the 3x3 grid
WORDS = ("go", "cat", "fish", "house", "planet")
QUESTION_TYPES = ("colour", "count", "position", "word")
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
BACKGROUND = (235, 235, 235)
GRID = 3
EVAL_OFFSET = 1 << 32  # eval indices start here, so train (index < 2**32) and eval never share a sample


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What the generator draws; `image_size` is the side of the square image in pixels."""

  image_size: int = 448
  question_types: tuple[str, ...] = QUESTION_TYPES
  difficulty: Literal["easy", "hard"] = "easy"
  max_count: int = 4
  words: tuple[str, ...] = WORDS
  seed: int = 0

  def __post_init__(self):
    unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
    if unknown or not self.question_types:
      raise ConfigError(f"synthetic.question_types {list(self.question_types)} must be a non-empty subset of "
                        f"{list(QUESTION_TYPES)}")
    if self.difficulty not in ("easy", "hard"):
      raise ConfigError(f"synthetic.difficulty {self.difficulty!r} is not one of 'easy', 'hard'")
    if not 1 <= self.max_count <= GRID * GRID - 2:
      raise ConfigError(f"synthetic.max_count must be in [1, {GRID * GRID - 2}], got {self.max_count}")
    if self.image_size < 2 * GRID:
      raise ConfigError(f"synthetic.image_size must be >= {2 * GRID}, got {self.image_size}")
    if len(set(self.words)) < 2:
      raise ConfigError("synthetic.words needs at least two distinct words")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                colour: tuple[int, int, int]) -> None:
  x0, y0, x1, y1 = box
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  else:
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


class _Scene:
  """One image under construction: shapes placed in grid cells, each cell used at most once."""

  def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
    self.cfg, self.rng = cfg, rng
    hard = cfg.difficulty == "hard"
    background = tuple(int(c) for c in rng.integers(190, 256, 3)) if hard else BACKGROUND
    self.image = Image.new("RGB", (cfg.image_size, cfg.image_size), background)
    self.draw = ImageDraw.Draw(self.image)
    self.free_cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    self.fill = 0.55 if hard else 0.75  # shape side as a fraction of the cell side

  def take_cell(self, cell: tuple[int, int] | None = None) -> tuple[int, int]:
    if cell is None:
      cell = self.free_cells[self.rng.integers(len(self.free_cells))]
    self.free_cells.remove(cell)
    return cell

  def add(self, shape: str, colour: str, cell: tuple[int, int] | None = None) -> None:
    row, col = self.take_cell(cell)
    step = self.cfg.image_size / GRID
    side = self.fill * step
    slack = (step - side) / 2
    x = col * step + slack + self.rng.uniform(-slack, slack) * 0.8
    y = row * step + slack + self.rng.uniform(-slack, slack) * 0.8
    _draw_shape(self.draw, shape, (x, y, x + side, y + side), COLOURS[colour])

  def add_distractors(self, avoid_shape: str | None = None, avoid_colour: str | None = None) -> None:
    """Hard mode only: 1-2 shapes that differ from the question's target in shape and colour."""
    if self.cfg.difficulty != "hard":
      return
    shapes = [s for s in SHAPES if s != avoid_shape]
    colours = [c for c in COLOURS if c != avoid_colour]
    corners = [c for c in ((0, 0), (0, 2), (2, 0), (2, 2)) if c in self.free_cells]
    for _ in range(min(self.rng.integers(1, 3), len(corners))):
      cell = corners.pop(self.rng.integers(len(corners)))
      self.add(shapes[self.rng.integers(len(shapes))], colours[self.rng.integers(len(colours))], cell)

  def write(self, word: str) -> None:
    size = self.cfg.image_size
    longest = max(self.cfg.words, key=len)
    font_size = max(8, int(size * 0.3))
    font = ImageFont.load_default(size=font_size)
    while font_size > 8 and font.getlength(longest) > 0.85 * size:
      font_size = int(font_size * 0.9)
      font = ImageFont.load_default(size=font_size)
    hard = self.cfg.difficulty == "hard"
    jitter = 0.15 * size if hard else 0.05 * size
    centre = (size / 2 + self.rng.uniform(-jitter, jitter), size / 2 + self.rng.uniform(-jitter, jitter))
    colour = tuple(int(c) for c in self.rng.integers(0, 80, 3)) if hard else (0, 0, 0)
    self.draw.text(centre, word, font=font, fill=colour, anchor="mm")


class SyntheticVQA:
  """Random-access synthetic VQA records: `{"id", "image" (PIL RGB), "messages", "answer", "question_type"}`.

  `split="train"` covers global indices [0, size); `split="eval"` covers [EVAL_OFFSET, EVAL_OFFSET + size).
  Question types cycle with the index, so every type is equally frequent.
  """

  def __init__(self, size: int, split: Literal["train", "eval"] = "train",
               config: SyntheticConfig = SyntheticConfig()):
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0 < size <= EVAL_OFFSET:
      raise ValueError(f"size must be in [1, {EVAL_OFFSET}], got {size}")
    self.size, self.split, self.config = size, split, config
    self.offset = EVAL_OFFSET if split == "eval" else 0

  def __len__(self) -> int:
    return self.size

  def rng(self, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for sample `index`; other `stream`s give independent draws for derived views."""
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for a synthetic {self.split} split of {self.size}")
    return np.random.default_rng((self.config.seed, self.offset + index, stream))

  def answer_set(self, question_type: str) -> tuple[str, ...]:
    """The closed set of answers of one question type."""
    return {
        "colour": tuple(COLOURS),
        "count": tuple(str(n) for n in range(1, self.config.max_count + 1)),
        "position": tuple(POSITIONS),
        "word": self.config.words,
    }[question_type]

  def __getitem__(self, index: int) -> dict[str, Any]:
    cfg = self.config
    rng = self.rng(index)
    qtype = cfg.question_types[(self.offset + index) % len(cfg.question_types)]
    scene = _Scene(cfg, rng)
    pick = lambda options: options[rng.integers(len(options))]
    if qtype == "colour":
      shape, colour = pick(SHAPES), pick(tuple(COLOURS))
      scene.add(shape, colour)
      scene.add_distractors(avoid_shape=shape, avoid_colour=colour)
      question, answer = f"What colour is the {shape}?", colour
    elif qtype == "count":
      shape, count = pick(SHAPES), int(rng.integers(1, cfg.max_count + 1))
      colour = pick(tuple(COLOURS))
      for _ in range(count):
        scene.add(shape, pick(tuple(COLOURS)) if cfg.difficulty == "hard" else colour)
      scene.add_distractors(avoid_shape=shape)
      question, answer = f"How many {shape}s are there?", str(count)
    elif qtype == "position":
      colour, position = pick(tuple(COLOURS)), pick(tuple(POSITIONS))
      scene.add(pick(SHAPES), colour, POSITIONS[position])
      scene.add_distractors(avoid_colour=colour)
      question, answer = f"Where is the {colour} shape?", position
    else:
      answer = pick(cfg.words)
      scene.write(answer)
      question = "Which word is written?"
    return {
        "id": f"synthetic-{self.split}-{index}",
        "image": scene.image,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "answer": answer,
        "question_type": qtype,
    }


class SyntheticPreferences:
  """DPO view of a `SyntheticVQA`: `{"id", "image", "prompt", "chosen", "rejected", "answer"}`."""

  def __init__(self, vqa: SyntheticVQA):
    self.vqa = vqa

  def __len__(self) -> int:
    return len(self.vqa)

  def __getitem__(self, index: int) -> dict[str, Any]:
    sample = self.vqa[index]
    wrong = [a for a in self.vqa.answer_set(sample["question_type"]) if a != sample["answer"]]
    rejected = wrong[self.vqa.rng(index, stream=1).integers(len(wrong))]
    return {"id": sample["id"], "image": sample["image"], "prompt": sample["messages"][:1],
            "chosen": sample["answer"], "rejected": rejected, "answer": sample["answer"]}


class SyntheticPrompts:
  """GRPO view of a `SyntheticVQA`: `{"id", "image", "prompt", "answer", "question_type"}`, no answer turn.

  Build the `SyntheticVQA` with `question_types=("count",)` for a verifiable counting task scored by
  `counting_reward`.
  """

  def __init__(self, vqa: SyntheticVQA):
    self.vqa = vqa

  def __len__(self) -> int:
    return len(self.vqa)

  def __getitem__(self, index: int) -> dict[str, Any]:
    sample = self.vqa[index]
    return {"id": sample["id"], "image": sample["image"], "prompt": sample["messages"][:1],
            "answer": sample["answer"], "question_type": sample["question_type"]}


def normalize_answer(text: str) -> str:
  """Lower-case, trimmed, without surrounding punctuation; number words become digits ('Three.' -> '3')."""
  text = re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"")
  return NUMBER_WORDS.get(text, text)


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of predictions equal to their answer after `normalize_answer`."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
  if not answers:
    raise ValueError("exact_match_accuracy needs at least one answer")
  hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
  return hits / len(answers)


def counting_reward(completion: str, answer: str) -> float:
  """1.0 when the first number in `completion` (digits or a number word) equals `answer`, else 0.0."""
  match = re.search(r"\d+|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", completion.lower())
  if match is None:
    return 0.0
  return float(int(NUMBER_WORDS.get(match.group(), match.group())) == int(answer))
