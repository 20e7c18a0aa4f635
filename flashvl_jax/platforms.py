"""Which JAX platforms a command line tool starts: libtpu is not loaded on a machine that has no TPU.

With libtpu installed (the `tpu` extra, for ahead-of-time TPU compiles on any host), JAX tries the TPU backend
first, and on a machine without TPU chips libtpu prints five lines of warnings, one of them an `E0000 ...
INVALID_ARGUMENT` that reads as a failure. The tools call `skip_absent_tpu()` before JAX starts a backend;
compiling for a TPU topology (`--compile-only --topology ...`) still loads libtpu, as it must. An explicit
`JAX_PLATFORMS` is always obeyed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

import jax

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (and some other Google devices) on the PCI bus
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def might_have_tpu() -> bool:
  """True if any Google PCI device is attached: then JAX is left to look for TPU chips itself."""
  return any(pathlib.Path(p).read_text().strip() == GOOGLE_PCI_VENDOR for p in glob.glob("/sys/bus/pci/devices/*/vendor"))


def platforms_without_tpu() -> str:
  return "cuda,cpu" if any(os.path.exists(p) for p in NVIDIA_DEVICE_FILES) else "cpu"


def skip_absent_tpu() -> str | None:
  """Restricts JAX to the other platforms when libtpu is installed but no TPU can be attached; returns them."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
    return None
  if might_have_tpu():
    return None
  platforms = platforms_without_tpu()
  jax.config.update("jax_platforms", platforms)
  return platforms
