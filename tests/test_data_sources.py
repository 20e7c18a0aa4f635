"""Data sources: LLaVA JSON/JSONL (lazily indexed), preference records, ArrayRecord round trip, TFDS error path."""

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from flashvl_jax.data.library_sources import TfdsSource
from flashvl_jax.data.sources import ArrayRecordSource, BadSampleError, JsonSource, parse_record, write_array_record

LLAVA = [
    {"id": "a", "image": "imgs/a.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]},
    {"id": "b", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}]},
    {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def _write_jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return path


def test_jsonl_llava_records_parse_to_messages(tmp_path):
  path = _write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in LLAVA])
  source = JsonSource(path)
  assert len(source) == 3
  a = source[0]
  assert a["id"] == "a" and a["image"] == str(tmp_path / "imgs" / "a.png")
  assert a["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                           {"role": "assistant", "content": "A cat."}]
  assert [m["role"] for m in source[1]["messages"]] == ["system", "user", "assistant"]
  assert source[1]["image"] is None
  assert source[2]["id"] == "data.jsonl:3"  # no id: file name and line number


def test_jsonl_is_indexed_by_offsets_and_a_malformed_line_is_one_bad_sample(tmp_path):
  lines = [json.dumps(LLAVA[0]), "", '{"id": "broken", "conversations": [', json.dumps(LLAVA[1])]
  source = JsonSource(_write_jsonl(tmp_path / "d.jsonl", lines), image_root=tmp_path / "root")
  assert len(source) == 3  # the blank line is not a record
  assert source[2]["id"] == "b" and source[0]["image"] == str(tmp_path / "root" / "imgs" / "a.png")
  with pytest.raises(BadSampleError, match=r"'d.jsonl:3'.*malformed JSON") as e:
    source[1]
  assert e.value.sample_id == "d.jsonl:3"


def test_json_list_file_and_file_level_errors(tmp_path):
  (tmp_path / "d.json").write_text(json.dumps(LLAVA))
  source = JsonSource(tmp_path / "d.json")
  assert len(source) == 3 and source[1]["id"] == "b" and source[2]["id"] == "d.json[2]"
  (tmp_path / "bad.json").write_text("[{")
  with pytest.raises(ValueError, match="bad.json is not valid JSON"):
    JsonSource(tmp_path / "bad.json")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    JsonSource(tmp_path / "missing.jsonl")
  (tmp_path / "d.csv").write_text("x")
  with pytest.raises(ValueError, match="expected a .json or .jsonl"):
    JsonSource(tmp_path / "d.csv")


@pytest.mark.parametrize("raw, match", [
    ({"id": "x"}, "non-empty list of conversation turns"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, "role 'robot'"),
    ({"id": "x", "conversations": [{"from": "human", "value": None}]}, "content must be a string"),
    ({"id": "x", "image": ["a.png", "b.png"], "conversations": LLAVA[0]["conversations"]}, "2 images"),
    ({"id": "x", "image": 7, "conversations": LLAVA[0]["conversations"]}, "'image' must be a path"),
    ({"id": "x", "prompt": "q", "chosen": "yes"}, "has no 'rejected'"),
    ({"id": "x", "chosen": "yes", "rejected": "no"}, "has no 'prompt'"),
    (["not", "a", "dict"], "must be a JSON object"),
])
def test_malformed_records_raise_bad_sample_with_reason(raw, match):
  with pytest.raises(BadSampleError, match=match):
    parse_record(raw, default_id="x")


def test_preference_records():
  text_prompt = parse_record({"id": "p", "image": "i.png", "prompt": "Which colour?", "chosen": "red",
                              "rejected": "blue"}, default_id="?", image_root="/data")
  assert text_prompt["prompt"] == [{"role": "user", "content": "Which colour?"}]
  assert (text_prompt["chosen"], text_prompt["rejected"], text_prompt["image"]) == ("red", "blue", "/data/i.png")
  conv = parse_record({"prompt": [{"from": "human", "value": "Q"}],
                       "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}, default_id="d:1")
  assert conv["id"] == "d:1" and conv["prompt"] == [{"role": "user", "content": "Q"}] and conv["chosen"] == "good"
  with pytest.raises(BadSampleError, match="'chosen' must .* end with an assistant turn"):
    parse_record({"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, default_id="d")


def test_array_record_round_trip_keeps_image_bytes_inline(tmp_path):
  image = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3))
  jpeg = io.BytesIO()
  image.save(jpeg, format="JPEG")
  records = [
      {"id": "pil", "image": image, "conversations": LLAVA[0]["conversations"]},
      {"id": "bytes", "image": jpeg.getvalue(), "messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]},
      {"id": "text", "image": None, "conversations": LLAVA[1]["conversations"]},
      {"id": "dpo", "image": None, "prompt": "q", "chosen": "a", "rejected": "b"},
  ]
  path = tmp_path / "d.array_record"
  assert write_array_record(records, path) == 4
  source = ArrayRecordSource(path)
  assert len(source) == 4
  pil = source[0]
  assert pil["id"] == "pil" and np.array_equal(np.asarray(Image.open(io.BytesIO(pil["image"]))), np.asarray(image))
  assert source[1]["image"] == jpeg.getvalue() and source[1]["messages"][1]["content"] == "a"
  assert source[2]["image"] is None and source[2]["messages"][0] == {"role": "system", "content": "Be brief."}
  assert source[3]["chosen"] == "a" and source[3]["prompt"] == [{"role": "user", "content": "q"}]
  with pytest.raises(FileNotFoundError, match="nope.array_record"):
    ArrayRecordSource(tmp_path / "nope.array_record")


def test_tfds_source_without_tensorflow_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail, installed or not
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    TfdsSource("mnist", "train")
