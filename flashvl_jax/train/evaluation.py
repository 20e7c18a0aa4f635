"""Evaluation by generation: greedy answers to held-out questions, scored by exact match, and shown.

Records are conversations ending with the reference answer (`messages[-1]`, an assistant turn); the model
answers everything before it. The teacher-forced loss and answer accuracy of the jitted eval step live in
`trainer` (they run every few steps and on several hosts); generation runs in one process at the end.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from flashvl_jax.api import FlashVL
from flashvl_jax.data.sources import DataError
from flashvl_jax.data.synthetic import exact_match_accuracy


def question_and_answer(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
  """(the conversation up to the last user turn, the reference answer) of a conversation record."""
  messages = record["messages"]
  if messages[-1]["role"] != "assistant":
    raise DataError(f"record {record.get('id')!r} does not end with an assistant answer to score against")
  return messages[:-1], messages[-1]["content"]


def greedy_answers(model: FlashVL, records: Sequence[dict[str, Any]], max_new_tokens: int) -> list[str]:
  """The model's greedy answers to `records` (one batch)."""
  questions = [question_and_answer(r)[0] for r in records]
  batch = model.processor([r["image"] for r in records], questions, add_generation_prompt=True)
  stop_ids = tuple(model.tokenizer.eos_ids)
  new_ids = model.generate(**batch, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
  return [model.tokenizer.decode([t for t in ids if t not in stop_ids]) for ids in new_ids]


def generation_accuracy(model: FlashVL, source: Any, *, batch_size: int, max_new_tokens: int) -> float:
  """Exact-match accuracy (`synthetic.normalize_answer`) of greedy answers over every record of `source`."""
  predictions, answers = [], []
  for start in range(0, len(source), batch_size):
    records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    predictions += greedy_answers(model, records, max_new_tokens)
    answers += [question_and_answer(r)[1] for r in records]
  return exact_match_accuracy(predictions, answers)


def show_answers(model: FlashVL, source: Any, count: int, max_new_tokens: int, write: Callable[[str], None]) -> None:
  """Writes the first `count` questions of `source` with the model's answer (via `FlashVL.chat`) and the truth, one
  line each (line breaks in an answer are shown as `\\n`)."""
  for i in range(min(count, len(source))):
    question, answer = question_and_answer(source[i])
    reply = model.chat(source[i]["image"], question, max_new_tokens=max_new_tokens)
    reply = reply.replace("\r", "\\r").replace("\n", "\\n")
    write(f"Q: {question[-1]['content']}  A: {reply}  (expected: {answer})")
