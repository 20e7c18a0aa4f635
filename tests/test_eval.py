"""`python -m flashvl_jax.eval`: benchmark formats, prompts, scoring rules on worked examples, and whole runs (a
briefly trained demo model on generated files with known answers; resume; errors)."""

import base64
import json
import os
import subprocess
import sys

import pytest

from convert.random_cmd import write_random
from flashvl_jax.data.sources import DataError
from flashvl_jax.eval import scoring
from flashvl_jax.eval.__main__ import main
from flashvl_jax.eval.benchmarks import Item, read_items
from flashvl_jax.eval.prompts import build_prompt, task_of
from flashvl_jax.testing.benchmark_files import write_choice_tsv, write_ocr_tsv, write_vqa_jsonl

OPTIONS = (("A", "red"), ("B", "blue"), ("C", "green"), ("D", "dark blue"))


@pytest.mark.parametrize("prediction, choice", [
    ("B", "B"), ("(C)", "C"), ("D. dark blue", "D"), ("The answer is C.", "C"), ("answer: b", "B"),
    ("blue", "B"), ("dark blue", "D"), ("It is green.", "C"), ("A red square", "A"), ("A", "A"),
    ("red and green", None), ("purple", None), ("", None)])
def test_option_letter_extraction(prediction, choice):
  assert scoring.extract_choice(prediction, OPTIONS) == choice


def test_scoring_rules_on_worked_examples():
  assert scoring.normalize_vqa("The Two cats.") == "2 cats"
  assert scoring.normalize_vqa("3.5 metres!") == "3.5 metres"
  assert scoring.score_exact("Two", ["2", "two dogs"]) == 1.0
  assert scoring.score_exact("a dog", ["cat"]) == 0.0
  assert scoring.score_substring("The sign says STOP here", ["stop"]) == 1.0
  assert scoring.score_substring("stp", ["stop"]) == 0.0
  assert scoring.score_substring("x ^ { 2 } + 1", ["x^{2}+1"], "Handwritten Mathematical Expression Recognition") == 1
  assert scoring.score_substring("x ^ { 2 } + 1", ["x^{2}+1"], "Regular Text Recognition") == 0
  assert scoring.levenshtein("kitten", "sitting") == 3
  assert scoring.score_anls("hello wrld", ["Hello World"]) == pytest.approx(1 - 1 / 11)
  assert scoring.score_anls("hello", ["goodbye", "Hello"]) == 1.0
  assert scoring.score_anls("abc", ["xyz"]) == 0.0  # distance 1.0 >= 0.5
  assert scoring.score_choice("blue", ["b"], OPTIONS) == 1.0


def test_prompts_and_task_types():
  item = Item("1", "What is shown?", ("B",), options=(("A", "a cat"), ("B", "a dog")), hint="A pet.")
  assert build_prompt(item, "mcq") == ("Hint: A pet.\nQuestion: What is shown?\nOptions:\nA. a cat\nB. a dog\n"
                                       "Please select the correct answer from the options above.")
  plain = Item("2", "What does it say?", ("stop",))
  assert build_prompt(plain, "ocr") == "What does it say?"
  assert task_of(item, "MMBench_DEV_EN.tsv", "auto") == "mcq"
  assert task_of(plain, "OCRBench.tsv", "auto") == "ocr"
  assert task_of(plain, "DocVQA_VAL.tsv", "auto") == "anls"
  assert task_of(plain, "TextVQA.jsonl", "auto") == "vqa"
  assert task_of(plain, "TextVQA.jsonl", "ocr") == "ocr"


def test_benchmark_files_are_read(tmp_path):
  tsv = read_items(write_choice_tsv(tmp_path / "mcq.tsv", count=4))
  assert len(tsv) == 5 and tsv[4].image == tsv[0].image and tsv[0].image.startswith(b"\x89PNG")
  assert [letter for letter, _ in tsv[1].options] == list("ABCD") and tsv[1].answers == ("B",)
  ocr = read_items(write_ocr_tsv(tmp_path / "OCRBench.tsv", count=2))
  assert ocr[0].answers == (ocr[0].answers[0], ocr[0].answers[0].upper())  # the list column
  jsonl = read_items(write_vqa_jsonl(tmp_path / "vqa.jsonl", count=2))
  assert jsonl[1].image == str(tmp_path / "images" / "vqa1.png") and not jsonl[1].options
  (tmp_path / "dup.jsonl").write_text('{"id": 1, "question": "q", "answer": "a"}\n' * 2)
  with pytest.raises(DataError, match="ids repeat"):
    read_items(tmp_path / "dup.jsonl")
  (tmp_path / "noanswer.tsv").write_text("index\tquestion\tanswer\n0\tq\t\n")
  with pytest.raises(DataError, match="no answer"):
    read_items(tmp_path / "noanswer.tsv")
  (tmp_path / "x.csv").write_text("q")
  with pytest.raises(DataError, match="--format"):
    read_items(tmp_path / "x.csv")
  (tmp_path / "bad.tsv").write_text(f"index\timage\tquestion\tanswer\n0\t{'%' * 80}\tq\ta\n")
  with pytest.raises(DataError, match="not base64"):
    read_items(tmp_path / "bad.tsv")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
  """The demo trained briefly on its colour and written-word questions (about a minute on 2 cores)."""
  out = tmp_path_factory.mktemp("demo")
  command = [sys.executable, "-m", "flashvl_jax.train", "steps=200", "data.synthetic.question_types=[colour,word]",
             "eval.every_steps=0", "data.eval_size=0", "demo_questions=0", f"output_dir={out}"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert result.returncode == 0, result.stderr[-3000:]
  return out / "model"


def test_demo_model_scores_well_above_chance(demo_model, tmp_path, capsys):
  files = [write_choice_tsv(tmp_path / "colours_mcq.tsv"), write_vqa_jsonl(tmp_path / "colours_vqa.jsonl"),
           write_ocr_tsv(tmp_path / "OCRBench_words.tsv")]
  assert main([str(demo_model), "--data", *map(str, files), "--out", str(tmp_path / "out"), "--no-progress",
               "--max-new-tokens", "8"]) == 0
  printed = capsys.readouterr().out
  scores = {line.split(":")[0]: float(line.split("accuracy: ")[1].split()[0])
            for line in printed.splitlines() if "accuracy: " in line}
  print(scores)  # the closing note quotes them
  assert scores["colours_mcq.tsv"] >= 0.75  # chance: 0.25 (four options)
  assert scores["colours_vqa.jsonl"] >= 0.75  # chance: 1/7 (seven colours)
  assert scores["OCRBench_words.tsv"] >= 0.5  # chance: 1/5 (five words)
  assert "| colours_mcq.tsv | mcq | 25 |" in printed
  assert (tmp_path / "out" / "results.md").read_text().startswith("| file | task |")
  records = [json.loads(line) for line in (tmp_path / "out" / "colours_mcq.predictions.jsonl").read_text().splitlines()]
  assert len(records) == 25 and all(r["choice"] in "ABCD" for r in records if r["score"])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
  return write_random("tiny-static", tmp_path_factory.mktemp("random") / "ckpt", progress=False)


def test_a_rerun_skips_finished_items_and_refuses_other_settings(random_model, tmp_path, capsys):
  data = write_vqa_jsonl(tmp_path / "vqa.jsonl", count=6)
  args = [str(random_model), "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress",
          "--max-new-tokens", "3", "--max-seq-len", "512"]
  assert main(args) == 0
  predictions = tmp_path / "out" / "vqa.predictions.jsonl"
  lines = predictions.read_text().splitlines()
  predictions.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # cut off while writing item 4
  capsys.readouterr()
  assert main(args) == 0
  assert "3 of 6 items already scored" in capsys.readouterr().out
  again = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert sorted(r["id"] for r in again) == [f"vqa{i}" for i in range(6)]
  assert again[:3] == [json.loads(line) for line in lines[:3]]
  assert main([*args[:-4], "--max-new-tokens", "4", "--max-seq-len", "512"]) == 2
  assert "other settings (max_new_tokens differ)" in capsys.readouterr().err
  assert main([*args[:-4], "--max-new-tokens", "4", "--max-seq-len", "512", "--overwrite"]) == 0


def test_errors_are_reported_before_the_model_loads(tmp_path, capsys):
  assert main(["no_such_ckpt", "--data", str(tmp_path / "missing.tsv")]) == 2
  assert "error: benchmark file" in capsys.readouterr().err
  (tmp_path / "b.tsv").write_text("a\tb\n1\t2\n")
  assert main(["no_such_ckpt", "--data", str(tmp_path / "b.tsv")]) == 2
  assert "needs a header with at least 'question'" in capsys.readouterr().err
  image = base64.b64encode(b"not an image").decode()
  (tmp_path / "img.tsv").write_text(f"index\timage\tquestion\tanswer\n0\t{image}\tq\ta\n")
  assert main(["no_such_ckpt", "--data", str(tmp_path / "img.tsv")]) == 2  # the checkpoint, after the data
  assert "no_such_ckpt" in capsys.readouterr().err


def test_an_unreadable_image_is_counted_as_failed(random_model, tmp_path, capsys):
  good = base64.b64encode(read_items(write_choice_tsv(tmp_path / "m.tsv", count=1))[0].image).decode()
  broken = base64.b64encode(b"not an image").decode()
  (tmp_path / "img.tsv").write_text(f"index\timage\tquestion\tanswer\n0\t{good}\tq\ta\n1\t{broken}\tq\ta\n")
  assert main([str(random_model), "--data", str(tmp_path / "img.tsv"), "--out", str(tmp_path / "out"),
               "--no-progress", "--max-new-tokens", "2", "--max-seq-len", "512"]) == 0
  assert "| img.tsv | vqa | 2 |" in capsys.readouterr().out
  failed = [json.loads(line) for line in (tmp_path / "out" / "img.predictions.jsonl").read_text().splitlines()
            if "error" in line]
  assert len(failed) == 1 and failed[0]["id"] == "1" and failed[0]["score"] == 0
  assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["failed"] == 1
