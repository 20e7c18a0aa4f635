"""Scoring rules: option-letter extraction (multiple choice), normalised exact match (VQA), substring match
(OCRBench) and ANLS (document VQA). Each `score_*` returns 0..1 for one prediction."""

from __future__ import annotations

import re
from typing import Sequence

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
ANLS_THRESHOLD = 0.5
# "(B)", "B.", "B)", "B:" or a lone "B" at the start; "answer is B" / "answer: B" anywhere
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[.):]|\s*$|\s)")
_STATED_LETTER = re.compile(r"answer\s*(?:is|:)?\s*\(?([A-Z])\b", re.IGNORECASE)


def extract_choice(prediction: str, options: Sequence[tuple[str, str]]) -> str | None:
  """The option letter a free-form answer names, or None when it names none or several.

  Tried in order: a leading letter (`B`, `(B)`, `B. text`), a stated one (`the answer is B`), then the option
  texts: exactly one option's text in the prediction (a prediction equal to one option's text wins outright).
  """
  letters = {letter for letter, _ in options}
  for pattern in (_LEADING_LETTER, _STATED_LETTER):
    match = pattern.search(prediction)
    if match and match.group(1).upper() in letters:
      letter = match.group(1).upper()
      # a sentence starting with the article "A" is not option A unless the rest is A's text
      if not (letter == "A" and pattern is _LEADING_LETTER and re.match(r"^\s*A\s+[a-z]", prediction)):
        return letter
  text = normalize_vqa(prediction)
  exact = [letter for letter, option in options if normalize_vqa(option) == text]
  if len(exact) == 1:
    return exact[0]
  contained = [letter for letter, option in options if normalize_vqa(option) and
               re.search(rf"\b{re.escape(normalize_vqa(option))}\b", text)]
  return contained[0] if len(contained) == 1 else None


def score_choice(prediction: str, answers: Sequence[str], options: Sequence[tuple[str, str]]) -> float:
  return float(extract_choice(prediction, options) in {a.strip().upper() for a in answers})


def normalize_vqa(text: str) -> str:
  """Lower case, punctuation dropped (decimal points kept), number words as digits, articles dropped."""
  text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower().strip())
  text = re.sub(r"[^\w\s.]", " ", text)
  words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
  return " ".join(words)


def score_exact(prediction: str, answers: Sequence[str]) -> float:
  return float(normalize_vqa(prediction) in {normalize_vqa(a) for a in answers})


def score_substring(prediction: str, answers: Sequence[str], category: str | None = None) -> float:
  """OCRBench's rule: an accepted answer occurs in the prediction, case-insensitively (whitespace ignored for
  handwritten mathematical expressions, whose spacing is arbitrary)."""
  squeeze = category is not None and "mathematical expression" in category.lower()
  clean = lambda s: re.sub(r"\s+", "", s) if squeeze else " ".join(s.lower().split())
  return float(any(clean(a) and clean(a) in clean(prediction) for a in answers))


def levenshtein(a: str, b: str) -> int:
  previous = list(range(len(b) + 1))
  for i, char_a in enumerate(a, start=1):
    current = [i]
    for j, char_b in enumerate(b, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
    previous = current
  return previous[-1]


def score_anls(prediction: str, answers: Sequence[str]) -> float:
  """Average Normalised Levenshtein Similarity of one prediction: the best 1 - distance / longer length over
  the answers, 0 where that distance is 0.5 or more."""
  best = 0.0
  p = " ".join(prediction.lower().split())
  for answer in answers:
    a = " ".join(answer.lower().split())
    distance = levenshtein(a, p) / max(len(a), len(p), 1)
    best = max(best, 1 - distance if distance < ANLS_THRESHOLD else 0.0)
  return best
