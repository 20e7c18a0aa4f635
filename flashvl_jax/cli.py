"""The error contract every command line tool shares (train, convert, chat, bench).

A problem the user can fix (`errors.UserError`, a missing or unwritable path, a full disk) is printed as
`error: <message>` on stderr and the tool exits with status 2, without a traceback; `--debug` (or the
environment variable FLASHVL_DEBUG=1) shows the traceback instead. Any other exception is a bug: it keeps its
traceback. Ctrl-C exits with status 130. A bad command line (`ArgumentParser`) prints `error: ...` and the
usage, and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable

from flashvl_jax.errors import UserError
from flashvl_jax.platforms import skip_absent_tpu

DEBUG_ENV = "FLASHVL_DEBUG"
USAGE_ERROR = 2
# OS errors about the user's paths and disks, as opposed to ones that reveal a bug.
USER_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                         errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.ENAMETOOLONG})


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the contract's message: a bad command line prints `error: ...` (then the usage) and exits 2."""

  def error(self, message: str):
    self.exit(USAGE_ERROR, f"error: {message}\n{self.format_usage()}(see {self.prog} --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true",
                      help=f"show the traceback of errors reported as 'error: ...' (or set {DEBUG_ENV}=1)")


def is_user_error(error: BaseException) -> bool:
  if isinstance(error, UserError):
    return True
  return isinstance(error, OSError) and error.errno in USER_ERRNOS


def describe(error: BaseException) -> str:
  """The one-line message: an OS error as `path: reason`, anything else as its text."""
  if isinstance(error, OSError) and error.strerror and not isinstance(error, UserError):
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {error.strerror}" if paths else error.strerror
  return str(error)


def run_cli(command: Callable[[], int | None], *, debug: bool = False) -> int:
  """Runs `command` under the error contract (JAX not looking for an absent TPU); returns the exit status."""
  skip_absent_tpu()
  debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  try:
    return command() or 0
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if debug or not is_user_error(e):
      raise
    print(f"error: {describe(e)}", file=sys.stderr)
    return USAGE_ERROR
