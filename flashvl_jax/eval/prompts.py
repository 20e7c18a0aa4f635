"""Prompts per task type, as VLMEvalKit's default dataset prompts build them (the model card evaluates Flash-VL
with VLMEvalKit and gives it no custom prompt): multiple choice lists the lettered options after the question
and asks for one; VQA, OCR and document VQA ask the question as written."""

from __future__ import annotations

from flashvl_jax.eval.benchmarks import Item

TASKS = ("mcq", "vqa", "ocr", "anls")
MCQ_INSTRUCTION = "Please select the correct answer from the options above."


def build_prompt(item: Item, task: str) -> str:
  if task != "mcq":
    return item.question
  lines = [f"Hint: {item.hint}"] if item.hint else []
  lines.append(f"Question: {item.question}")
  lines.append("Options:")
  lines += [f"{letter}. {text}" for letter, text in item.options]
  lines.append(MCQ_INSTRUCTION)
  return "\n".join(lines)


def task_of(item: Item, file_name: str, requested: str) -> str:
  """The task type scoring `item`: `requested` unless 'auto'; then the item's own, multiple choice when it has
  options, OCR for OCRBench files, ANLS for DocVQA / InfoVQA files, else VQA."""
  if requested != "auto":
    return requested
  name = file_name.lower()
  if item.task:
    return item.task
  if item.options:
    return "mcq"
  if "ocrbench" in name:
    return "ocr"
  if "docvqa" in name or "infovqa" in name:
    return "anls"
  return "vqa"
