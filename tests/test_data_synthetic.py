"""The synthetic VQA generator: determinism, disjoint splits, answers that match the pixels, DPO/GRPO views."""

import numpy as np
import pytest
from scipy import ndimage

from flashvl_jax.config import ConfigError
from flashvl_jax.data.synthetic import (BACKGROUND, COLOURS, EVAL_OFFSET, POSITIONS, SyntheticConfig,
                                        SyntheticPreferences, SyntheticPrompts, SyntheticVQA, counting_reward,
                                        exact_match_accuracy, normalize_answer)

SIZE = 96


def _vqa(n=24, split="train", **kw):
  return SyntheticVQA(n, split, SyntheticConfig(image_size=SIZE, **kw))


def _masks_by_colour(image):
  """{colour name: boolean mask} of the pixels painted exactly in each palette colour."""
  pixels = np.asarray(image)
  return {name: (pixels == rgb).all(-1) for name, rgb in COLOURS.items() if (pixels == rgb).all(-1).any()}


def test_same_index_same_sample_and_seed_changes_it():
  a, b = _vqa(), _vqa()
  for i in (0, 5, 23):
    assert a[i]["messages"] == b[i]["messages"] and a[i]["id"] == f"synthetic-train-{i}"
    assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
  other = _vqa(seed=1)
  assert any(not np.array_equal(np.asarray(a[i]["image"]), np.asarray(other[i]["image"])) for i in range(4))
  with pytest.raises(IndexError, match="out of range"):
    a[24]


def test_train_and_eval_splits_are_disjoint_index_ranges():
  train, held_out = _vqa(8), _vqa(8, "eval")
  assert held_out.offset == EVAL_OFFSET and train.offset == 0
  assert {train[i]["id"] for i in range(8)}.isdisjoint(held_out[i]["id"] for i in range(8))
  assert all(not np.array_equal(np.asarray(train[i]["image"]), np.asarray(held_out[i]["image"])) for i in range(8))


def test_question_types_cycle_and_answers_come_from_the_closed_sets():
  vqa = _vqa(40)
  types = [vqa[i]["question_type"] for i in range(8)]
  assert types == ["colour", "count", "position", "word"] * 2
  for i in range(40):
    sample = vqa[i]
    assert sample["answer"] in vqa.answer_set(sample["question_type"])
    assert sample["messages"][1] == {"role": "assistant", "content": sample["answer"]}
    assert sample["image"].size == (SIZE, SIZE) and sample["image"].mode == "RGB"


def test_answers_match_the_pixels():
  vqa = _vqa(48)
  word_widths = {}
  for i in range(48):
    s = vqa[i]
    masks = _masks_by_colour(s["image"])
    if s["question_type"] == "colour":
      assert list(masks) == [s["answer"]]
      assert masks[s["answer"]].mean() > 0.02  # a big shape, not a few pixels
    elif s["question_type"] == "count":
      (mask,) = masks.values()  # easy: all counted shapes share one colour
      assert ndimage.label(mask)[1] == int(s["answer"])
    elif s["question_type"] == "position":
      (name,) = masks
      assert f"the {name} shape" in s["messages"][0]["content"]
      row, col = np.argwhere(masks[name]).mean(0) / (SIZE / 3)
      assert (int(row), int(col)) == POSITIONS[s["answer"]]
    else:
      ink = (np.asarray(s["image"]) != BACKGROUND).any(-1)
      cols = np.flatnonzero(ink.any(0))
      word_widths.setdefault(s["answer"], cols[-1] - cols[0])
  widths = [word_widths[w] for w in sorted(word_widths, key=len)]
  assert len(widths) >= 3 and widths == sorted(widths)  # rendered text: longer words are wider


def test_hard_difficulty_adds_distractors():
  easy, hard = _vqa(12), _vqa(12, difficulty="hard")
  colour_questions = [i for i in range(12) if easy[i]["question_type"] == "colour"]
  assert all(len(_masks_by_colour(easy[i]["image"])) == 1 for i in colour_questions)
  assert all(len(_masks_by_colour(hard[i]["image"])) >= 2 for i in colour_questions)
  assert all(hard[i]["answer"] in _masks_by_colour(hard[i]["image"]) for i in colour_questions)


def test_preference_view_pairs_the_answer_with_a_wrong_one():
  vqa = _vqa(16)
  prefs = SyntheticPreferences(vqa)
  rejected = []
  for i in range(16):
    pair, sample = prefs[i], vqa[i]
    assert pair["chosen"] == sample["answer"] and pair["prompt"] == sample["messages"][:1]
    assert pair["rejected"] != pair["chosen"] and pair["rejected"] in vqa.answer_set(sample["question_type"])
    assert SyntheticPreferences(_vqa(16))[i]["rejected"] == pair["rejected"]
    rejected.append(pair["rejected"])
  assert len(set(rejected)) > 3


def test_counting_prompts_and_reward():
  prompts = SyntheticPrompts(_vqa(6, question_types=("count",)))
  for i in range(6):
    p = prompts[i]
    assert p["question_type"] == "count" and len(p["prompt"]) == 1 and p["prompt"][0]["role"] == "user"
    assert counting_reward(p["answer"], p["answer"]) == 1.0
  assert counting_reward("There are 3 squares.", "3") == 1.0
  assert counting_reward("three", "3") == 1.0
  assert counting_reward("I see 4, not 3", "3") == 0.0
  assert counting_reward("none", "3") == 0.0


def test_exact_match_accuracy():
  assert normalize_answer("  Red. ") == "red" and normalize_answer("Three!") == "3"
  assert exact_match_accuracy(["Red.", "3", "left", "cat"], ["red", "three", "right", "cat"]) == 0.75
  with pytest.raises(ValueError, match="2 predictions for 1 answers"):
    exact_match_accuracy(["a", "b"], ["a"])


@pytest.mark.parametrize("kw, match", [
    (dict(question_types=("colour", "smell")), "question_types"),
    (dict(difficulty="medium"), "difficulty"),
    (dict(max_count=9), "max_count"),
    (dict(words=("same", "same")), "two distinct words"),
])
def test_bad_config_is_rejected(kw, match):
  with pytest.raises(ConfigError, match=match):
    SyntheticConfig(**kw)
