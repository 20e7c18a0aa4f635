"""Input-pipeline throughput: images/s per tiling mode, with read threads and with worker processes.

  python -m flashvl_jax.data.bench                      # flashvl-2b-dynamic-iss geometry, all four modes
  python -m flashvl_jax.data.bench --preset tiny-iss --num-images 16 --image-size 64 --modes static iss

Images are synthetic-dataset scenes encoded as JPEG bytes, so each sample pays for decoding, tiling and
tokenizing. The timer starts after the first batch (worker start-up excluded) and runs over the next
`--batches` batches of an endlessly repeated source.
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Sequence

from absl import flags

from flashvl_jax.cli import ArgumentParser
from flashvl_jax.config import load_config
from flashvl_jax.data.pipeline import make_dataset
from flashvl_jax.data.synthetic import SyntheticConfig, SyntheticVQA
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer

MODES = ("static", "dynamic", "overlap", "iss")


def jpeg_records(num_images: int, image_size: int) -> list[dict]:
  """Synthetic VQA records with their images encoded as JPEG bytes."""
  vqa = SyntheticVQA(num_images, config=SyntheticConfig(image_size=image_size))
  records = []
  for i in range(num_images):
    record = vqa[i]
    buf = io.BytesIO()
    record["image"].save(buf, format="JPEG", quality=90)
    records.append({"id": record["id"], "image": buf.getvalue(), "messages": record["messages"]})
  return records


def images_per_second(records: list[dict], processor: Processor, *, batch_size: int, batches: int,
                      num_threads: int, num_workers: int) -> float:
  ds = make_dataset(records, processor, batch_size=batch_size, num_epochs=None, num_threads=num_threads,
                    num_workers=num_workers, shard_index=0, shard_count=1, bad_sample_policy="fail")
  it = iter(ds)
  try:
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    it.close()  # stops worker processes now, not at interpreter exit


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
  parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="flashvl-2b-dynamic-iss", help="model preset giving the tile geometry")
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  parser.add_argument("--num-images", type=int, default=16, help="distinct source images")
  parser.add_argument("--image-size", type=int, default=448, help="side of the square source images")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--batches", type=int, default=5, help="timed batches per setting")
  parser.add_argument("--threads", type=int, default=2, help="read threads of the threaded setting")
  parser.add_argument("--workers", type=int, default=2, help="worker processes of the multiprocess setting (0: skip)")
  parser.add_argument("--max-length", type=int, default=1024)
  args = parser.parse_args(argv)
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

  records = jpeg_records(args.num_images, args.image_size)
  tokenizer = load_tokenizer("qwen2.5")
  settings = {"sequential": (0, 0), f"threads={args.threads}": (args.threads, 0)}
  if args.workers:
    settings[f"workers={args.workers}"] = (0, args.workers)
  results = {}
  for mode in args.modes:
    processor = Processor(load_config(args.preset, [f"tiling.mode={mode}"]), tokenizer, max_length=args.max_length)
    for name, (threads, workers) in settings.items():
      results[mode, name] = images_per_second(records, processor, batch_size=args.batch_size,
                                              batches=args.batches, num_threads=threads, num_workers=workers)
  print(f"images/s, {args.preset} tiles, {args.image_size}x{args.image_size} JPEG sources, batch {args.batch_size}")
  print(f"{'mode':<8}" + "".join(f"{name:>14}" for name in settings))
  for mode in args.modes:
    print(f"{mode:<8}" + "".join(f"{results[mode, name]:>14.1f}" for name in settings))
  return results


if __name__ == "__main__":
  main()
