"""Data where users keep it: the field mapping, parquet shards in Hugging Face `datasets`' layout and a TFDS dataset
prepared locally (read without TensorFlow), reached from the training config; exact resume over every source."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from flashvl_jax.config import ConfigError
from flashvl_jax.data.fields import Fields
from flashvl_jax.data.library_sources import ParquetSource, TfdsSource
from flashvl_jax.data.pipeline import make_dataset
from flashvl_jax.data.sources import ArrayRecordSource, DataError, JsonSource, write_array_record
from flashvl_jax.errors import MissingPathError
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer
from flashvl_jax.config import load_config
from flashvl_jax.testing.stored_datasets import qa_rows, write_parquet, write_tfds
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.data_sources import open_sources
from flashvl_jax.train.objectives import OBJECTIVES

QA = Fields(question="question", answer="answer")
ROWS = 12


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  """The same 12 rows as JSONL, ArrayRecord, parquet (2 shards, row groups of 4) and TFDS (train 12, test 4)."""
  root = tmp_path_factory.mktemp("stored")
  rows = qa_rows(ROWS)
  (root / "qa.jsonl").write_text("".join(json.dumps({**r, "image": None}) + "\n" for r in rows))
  write_array_record(rows, root / "qa.array_record")
  write_parquet(rows, root / "parquet", shards=2, row_group_size=4)
  write_tfds({"train": rows, "test": qa_rows(4, split="eval")}, root / "tfds")
  return root, rows


def test_fields_map_other_names_to_conversations():
  raw = {"qid": b"7", "picture": {"bytes": b"\x89PNG", "path": "a.png"}, "q": b"What?", "a": np.bytes_(b"Red")}
  record = Fields(id="qid", image="picture", question="q", answer="a").to_record(raw)
  assert record == {"id": "7", "image": b"\x89PNG", "conversations": [{"role": "user", "content": "What?"},
                                                                      {"role": "assistant", "content": "Red"}]}
  turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
  assert Fields(messages="dialog").to_record({"dialog": json.dumps(turns)})["conversations"] == turns
  assert Fields().to_record({"prompt": "[1, 2] sums to?"})["prompt"] == "[1, 2] sums to?"
  assert Fields().to_record({"messages": turns, "image": {"bytes": None, "path": "x.jpg"}}) == {
      "conversations": turns, "image": "x.jpg"}
  assert Fields().missing({"messages": turns}) == []
  assert Fields(question="q", answer="a").missing({"q": 1}) == ["data.fields.answer ('a')"]
  assert Fields().missing({"text": "x"}) == ["data.fields.messages (none of conversations, messages)"]
  assert Fields().missing({"prompt": "p", "chosen": "c"}) == ["data.fields.rejected ('rejected')"]
  with pytest.raises(ConfigError, match="go together"):
    Fields(question="q")
  with pytest.raises(ConfigError, match="not both"):
    Fields(messages="m", question="q", answer="a")


def test_parquet_source_reads_datasets_shards(stored):
  root, rows = stored
  source = ParquetSource(root / "parquet", fields=QA)
  assert len(source) == ROWS and len(source.files) == 2
  for i in (0, 5, 6, 11, 3):  # across shards and row groups, out of order
    record = source[i]
    assert record["id"] == rows[i]["id"] and record["image"] == rows[i]["image"]
    assert record["messages"] == [{"role": "user", "content": rows[i]["question"]},
                                  {"role": "assistant", "content": rows[i]["answer"]}]
  copy = pickle.loads(pickle.dumps(source))  # as grain worker processes get it
  assert copy[7]["id"] == rows[7]["id"]
  assert ParquetSource(str(root / "parquet" / "*.parquet"), fields=QA)[11]["id"] == rows[11]["id"]
  with pytest.raises(MissingPathError, match="no data files"):
    ParquetSource(root / "nothing_here")
  (root / "broken.parquet").write_bytes(b"not parquet")
  with pytest.raises(DataError, match="not a readable parquet file"):
    ParquetSource(root / "broken.parquet")


def test_tfds_source_reads_a_prepared_dataset_without_tensorflow(stored):
  root, rows = stored
  source = TfdsSource("tiny_vqa", "train", data_dir=root / "tfds", fields=QA)
  assert len(source) == ROWS
  by_id = {r["id"]: r for r in rows}
  record = source[3]
  expected = by_id[record["id"]]  # TFDS stores examples in the order of their keys' hashes
  assert record["image"] == expected["image"]  # left encoded, for the pipeline to decode
  assert record["messages"][1] == {"role": "assistant", "content": expected["answer"]}
  with pytest.raises(DataError, match="Unknown split 'validation'"):
    TfdsSource("tiny_vqa", "validation", data_dir=root / "tfds")
  with pytest.raises(DataError, match="Dataset no_such_dataset not found"):
    TfdsSource("no_such_dataset", "train", data_dir=root / "tfds")


def test_a_mapping_that_does_not_fit_stops_before_training(stored):
  root, _ = stored
  cfg = load_train_config("tiny", ["data.source=parquet", f"data.path={root / 'parquet'}",
                                   "data.fields.question=prompt_text", "data.fields.answer=answer"])
  with pytest.raises(ConfigError, match=r"no field for data.fields.question \('prompt_text'\); their fields are "
                                        r"'id', 'image', 'question', 'answer'"):
    open_sources(cfg.data, OBJECTIVES[cfg.objective].records)
  with pytest.raises(ConfigError, match="data.eval_split"):
    load_train_config("tiny", ["data.source=tfds", "data.path=tiny_vqa", "data.eval_path=x"])
  with pytest.raises(ConfigError, match="data.path .the TFDS dataset name. is required"):
    load_train_config("tiny", ["data.source=tfds"])
  with pytest.raises(ConfigError, match="for data.source tfds"):
    load_train_config("tiny", ["data.source=json", "data.path=x.jsonl", "data.eval_split=test"])


@pytest.fixture(scope="module")
def processor():
  cfg = load_config("tiny-static")
  return Processor(cfg, load_tokenizer("qwen2.5"), max_length=96)


@pytest.mark.parametrize("kind", ["json", "arrayrecord", "parquet", "tfds"])
def test_every_source_resumes_exactly(stored, processor, kind):
  root, _ = stored
  source = {"json": lambda: JsonSource(root / "qa.jsonl", fields=QA),
            "arrayrecord": lambda: ArrayRecordSource(root / "qa.array_record", fields=QA),
            "parquet": lambda: ParquetSource(root / "parquet", fields=QA),
            "tfds": lambda: TfdsSource("tiny_vqa", "train", data_dir=root / "tfds", fields=QA)}[kind]
  kw = dict(batch_size=2, seed=5, num_epochs=None, shard_index=0, shard_count=1, num_threads=2, prefetch=2)
  take = lambda it, n: [next(it) for _ in range(n)]
  it = iter(make_dataset(source(), processor, **kw))
  take(it, 4)
  state = it.get_state()
  expected = take(it, 5)  # crosses an epoch (6 batches per epoch)
  restored = iter(make_dataset(source(), processor, **kw))
  restored.set_state(state)
  for got, want in zip(take(restored, 5), expected):
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def _train_cli(tmp_path, *overrides):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  command = [sys.executable, "-m", "flashvl_jax.train", "tiny", f"output_dir={tmp_path / 'run'}", "steps=2",
             "global_batch_size=4", "data.max_length=96", *overrides]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["tfds", "parquet"])
def test_train_command_reads_the_source(stored, tmp_path, kind):
  root, _ = stored
  where = {"tfds": ["data.path=tiny_vqa", f"data.tfds_data_dir={root / 'tfds'}", "data.eval_split=test"],
           "parquet": [f"data.path={root / 'parquet'}", f"data.eval_path={root / 'parquet' / '*00001*'}"]}[kind]
  result = _train_cli(tmp_path, f"data.source={kind}", *where, "data.fields.question=question",
                      "data.fields.answer=answer")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2]
  assert any("eval/loss" in m for m in metrics)
  assert "Traceback" not in result.stderr and "OpenCV" not in result.stderr


def test_train_command_names_a_missing_tfds_split(stored, tmp_path):
  root, _ = stored
  result = _train_cli(tmp_path, "data.source=tfds", "data.path=tiny_vqa", f"data.tfds_data_dir={root / 'tfds'}",
                      "data.split=validation")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "error: data.path: TFDS dataset 'tiny_vqa' split 'validation' cannot be opened" in result.stderr
