"""Training metrics on the console (tqdm), in TensorBoard (tensorboardX) and in a JSONL file.

Only process 0 writes; on the others every call is a no-op. On resume, `metrics.jsonl` keeps the records up
to the restored step, so it holds one record per step even after a crash.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Callable, Mapping

import tqdm
from tensorboardX import SummaryWriter


def _truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
  path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
  """A progress bar over `total_steps` plus TensorBoard events and `metrics.jsonl` under `output_dir`."""

  def __init__(self, output_dir: str | pathlib.Path, total_steps: int, start_step: int, enabled: bool):
    self.enabled = enabled
    if not enabled:
      return
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = out / "metrics.jsonl"
    if self.jsonl_path.exists():
      _truncate_jsonl(self.jsonl_path, start_step)
    self.jsonl = open(self.jsonl_path, "a")
    self.tensorboard = SummaryWriter(str(out / "events"))
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

  def progress(self, step: int, metrics: Mapping[str, float]) -> None:
    """Advances the bar to `step` (1-based count of finished steps) showing loss, lr, tokens/s, MFU and (when
    any) the bad samples skipped."""
    if not self.enabled:
      return
    shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['learning_rate']:.2e}",
             "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
    if "mfu" in metrics:
      shown["mfu"] = f"{metrics['mfu']:.1%}"
    else:
      shown["TFLOP/s/dev"] = f"{metrics['tflops_per_device']:.3f}"
    if metrics.get("skipped"):
      shown["skipped"] = f"{metrics['skipped']:.0f}"
    self.bar.set_postfix(shown, refresh=False)
    self.bar.update(step - self.bar.n)
    if self.bar.n >= self.bar.total:
      self.bar.close()  # done: what is printed next (eval, answers) goes below it, not around a redrawn bar

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    """One JSONL record `{"step", "<prefix>/<name>": value, ...}` and the same scalars in TensorBoard."""
    if not self.enabled:
      return
    record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                 for k, v in record.items()}) + "\n")
    self.jsonl.flush()
    for key, value in record.items():
      if key != "step":
        self.tensorboard.add_scalar(key, value, step)

  def print(self, message: str) -> None:
    """A line above the progress bar."""
    if self.enabled:
      tqdm.tqdm.write(message)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.tensorboard.close()
      self.jsonl.close()
      self.enabled = False  # later calls (e.g. closing again after an error) do nothing


class Throughput:
  """Wall time between calls -> step_seconds, tokens_per_s, tflops_per_device and (with a known peak) mfu.

  `step_flops(metrics)` gives the model FLOPs of the step the metrics describe.
  """

  def __init__(self, step_flops: Callable[[Mapping[str, float]], float], num_devices: int, peak: float | None):
    self.step_flops, self.num_devices, self.peak = step_flops, num_devices, peak
    self.last = time.perf_counter()

  def __call__(self, metrics: Mapping[str, float]) -> dict[str, float]:
    now = time.perf_counter()
    seconds, self.last = now - self.last, now
    flops_per_device = self.step_flops(metrics) / seconds / self.num_devices
    out = {"step_seconds": seconds, "tokens_per_s": metrics["tokens"] / seconds,
           "tflops_per_device": flops_per_device / 1e12}
    if self.peak:
      out["mfu"] = flops_per_device / self.peak
    return out
