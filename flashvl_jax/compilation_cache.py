"""JAX's persistent compilation cache: one setting that lets a second start of chat / train / bench skip XLA.

The directory comes from (first found) the `--compilation-cache DIR` flag of each CLI, the train config key
`compilation_cache_dir`, or the environment variable `JAX_COMPILATION_CACHE_DIR` (JAX's own). Compiled
executables are keyed by the program, the shapes, the devices and the jax / XLA versions, so a stale entry is
never used; deleting the directory is always safe.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def enable_compilation_cache(directory: str | os.PathLike | None = None,
                             min_compile_seconds: float = 0.5) -> pathlib.Path | None:
  """Caches every compilation that takes over `min_compile_seconds` in `directory` (default
  `$JAX_COMPILATION_CACHE_DIR`; neither set: the cache stays off). Quicker compilations are not worth a disk
  read. Returns the directory in use, or None."""
  directory = directory or os.environ.get(ENV_VAR)
  if not directory:
    return None
  path = pathlib.Path(directory).expanduser().absolute()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
