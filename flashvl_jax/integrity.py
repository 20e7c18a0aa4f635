"""Content checksums of checkpoint directories, and a write probe for their destinations.

A checkpoint's `checksums.json` lists every file under it with its size and CRC-32 (zlib's, ~4 GB/s on one core;
it catches truncated, missing and bit-flipped files, not deliberate tampering). `write_manifest` writes it once
the files are complete; `verify_manifest` re-reads every byte and raises `CorruptCheckpointError` naming each file
that differs. `probe_writable` fails within seconds, with the path and errno, where a later write would fail, and
`storage_errors` turns a write that fails for the same reasons later (a disk filling up) into the same error.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import tempfile
import zlib
from typing import Callable, Iterable, TypeVar

from flashvl_jax.errors import UserError

MANIFEST_FILE = "checksums.json"
BLOCK_BYTES = 16 << 20
# The errnos of a destination that cannot take the write; TensorStore reports them as "[os_error_code='28']".
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
T = TypeVar("T")


class CorruptCheckpointError(UserError, OSError):
  """A checkpoint's files do not match its checksums (truncated, missing, changed)."""


class NotWritableError(UserError, OSError):
  """A destination cannot be written (read-only, no permission, full, or not a directory)."""


def file_crc32(path: pathlib.Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(BLOCK_BYTES):
      crc = zlib.crc32(block, crc)
  return crc


def _files(directory: pathlib.Path, skip: Iterable[str]) -> list[pathlib.Path]:
  skipped = set(skip) | {MANIFEST_FILE}
  return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() not in skipped)


def write_manifest(directory: str | pathlib.Path, *, skip: Iterable[str] = ()) -> None:
  """Writes `directory/checksums.json` over every file under it except `skip` (relative paths)."""
  directory = pathlib.Path(directory)
  files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "crc32": file_crc32(p)}
           for p in _files(directory, skip)}
  (directory / MANIFEST_FILE).write_text(json.dumps({"algorithm": "crc32", "files": files}, indent=1))


def has_manifest(directory: str | pathlib.Path) -> bool:
  return (pathlib.Path(directory) / MANIFEST_FILE).is_file()


def verify_manifest(directory: str | pathlib.Path) -> int:
  """Checks every file listed in `directory/checksums.json`; returns the bytes checked.

  Raises `CorruptCheckpointError` listing every missing, resized or changed file (files the manifest does not
  list are ignored: e.g. a tokenizer copied in later).
  """
  directory = pathlib.Path(directory)
  try:
    listed = json.loads((directory / MANIFEST_FILE).read_text())["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CorruptCheckpointError(f"{directory / MANIFEST_FILE} cannot be read ({e})") from None
  problems, checked = [], 0
  for name, want in listed.items():
    path = directory / name
    if not path.is_file():
      problems.append(f"{name}: missing")
      continue
    size = path.stat().st_size
    if size != want["size"]:
      problems.append(f"{name}: {size} bytes, {want['size']} when written (truncated or replaced)")
    elif file_crc32(path) != want["crc32"]:
      problems.append(f"{name}: its contents changed since it was written (checksum mismatch)")
    checked += size
  if problems:
    shown = "\n".join(f"  {p}" for p in problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10
                                                           else "")
    raise CorruptCheckpointError(f"{directory} is damaged: {len(problems)} of its {len(listed)} files do not match "
                                 f"{MANIFEST_FILE}:\n{shown}")
  return checked


def _not_writable(directory: pathlib.Path, what: str, errno_: int | None, reason: str) -> NotWritableError:
  code = f" ({errno.errorcode.get(errno_, errno_)})" if errno_ else ""
  error = NotWritableError(f"cannot write the {what} {directory}: {reason}{code}; choose a writable location with "
                           "free space")
  error.errno = errno_
  return error


def storage_errors(call: Callable[[], T], directory: str | pathlib.Path, what: str) -> T:
  """`call()`, with a write failure caused by the destination (a full disk, a read-only or forbidden folder;
  Orbax and TensorStore raise these as ValueError with an `os_error_code`) raised as `NotWritableError`."""
  try:
    return call()
  except Exception as e:  # pylint: disable=broad-except
    code = e.errno if isinstance(e, OSError) else None
    match = re.search(r"os[_ ]error(?:_code)?[=' ]*(\d+)", str(e))  # TensorStore's and safetensors' wording
    code = int(match.group(1)) if match else code
    if code not in STORAGE_ERRNOS or isinstance(e, NotWritableError):
      raise
    raise _not_writable(pathlib.Path(directory), what, code, os.strerror(code)) from e


def probe_writable(directory: str | pathlib.Path, what: str = "directory") -> None:
  """Creates `directory` (and parents) and writes, syncs and deletes a small file in it, so that a read-only,
  full or forbidden destination fails now instead of after minutes of work."""
  directory = pathlib.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise _not_writable(directory, what, e.errno, e.strerror or str(e)) from None
