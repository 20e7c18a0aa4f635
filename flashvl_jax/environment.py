"""The machine and package versions a benchmark ran on, for its printed header and JSON record."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
from typing import Any

import jax


def environment() -> dict[str, Any]:
  """Date, JAX backend and devices, CPU, and the versions of python, jax, flax, torch and transformers."""
  import flax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel  # optional: benchmarks need it, the package does not
  import transformers  # pylint: disable=import-outside-toplevel

  cpu = platform.processor()
  if pathlib.Path("/proc/cpuinfo").is_file():
    names = [line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
  device = jax.devices()[0]
  return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              jax_backend=jax.default_backend(), device=device.device_kind, device_count=jax.device_count(),
              cpu=cpu, cpu_cores=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
              flax=flax.__version__, torch=torch.__version__, transformers=transformers.__version__,
              torch_device="cuda" if torch.cuda.is_available() else "cpu")
