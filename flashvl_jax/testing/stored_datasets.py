"""The same question/answer records stored the ways users keep data: a TFDS dataset prepared locally (ArrayRecord
files; no TensorFlow needed when images are given encoded) and parquet shards in the layout Hugging Face `datasets`
writes (images as `{"bytes", "path"}` structs, small row groups).

Rows are `{"id", "image": PNG bytes, "question", "answer"}`; `qa_rows` draws them from the synthetic task.
"""

from __future__ import annotations

import io
import pathlib
from typing import Mapping, Sequence

from flashvl_jax.data.synthetic import SyntheticConfig, SyntheticVQA


def png(image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def qa_rows(count: int, split: str = "train", image_size: int = 56) -> list[dict]:
  vqa = SyntheticVQA(count, split, SyntheticConfig(image_size=image_size))
  return [{"id": r["id"], "image": png(r["image"]), "question": r["messages"][0]["content"], "answer": r["answer"]}
          for r in (vqa[i] for i in range(count))]


def write_parquet(rows: Sequence[Mapping], directory: str | pathlib.Path, *, shards: int = 2,
                  row_group_size: int = 4) -> list[pathlib.Path]:
  """`rows` as `directory/train-0000k-of-0000n.parquet`, as `datasets.Dataset.to_parquet` lays them out."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  schema = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("question", pa.string()), ("answer", pa.string())])
  paths = []
  per_shard = -(-len(rows) // shards)
  for k in range(shards):
    part = rows[k * per_shard:(k + 1) * per_shard]
    table = pa.Table.from_pylist([{**r, "image": {"bytes": r["image"], "path": None}} for r in part], schema=schema)
    paths.append(directory / f"train-{k:05d}-of-{shards:05d}.parquet")
    pq.write_table(table, paths[-1], row_group_size=row_group_size)
  return paths


def write_tfds(splits: Mapping[str, Sequence[Mapping]], data_dir: str | pathlib.Path, name: str = "tiny_vqa") -> str:
  """Prepares the TFDS dataset `name` (version 1.0.0, ArrayRecord files) under `data_dir`; returns `name`."""
  import tensorflow_datasets as tfds

  dataset_name = name

  class StoredQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")
    # A one-part module name: for a class in a package, tfds 4.9.10 looks up its source through
    # `importlib_resources`, which it does not install.
    __module__ = "stored_datasets"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "image": tfds.features.Image(shape=(None, None, 3)),
          "question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
      for row in rows:
        yield row["id"], dict(row)

  builder = StoredQa(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return name
