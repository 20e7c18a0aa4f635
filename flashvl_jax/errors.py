"""The base class of errors a user can fix (a bad config, path, file or input).

Every CLI (`flashvl_jax.cli.run_cli`) prints such an error as one `error: ...` line and exits 2, without a
traceback; any other exception is a bug and keeps its traceback. Library callers catch `UserError` (or the
specific subclass, which also derives from the matching built-in, e.g. `ValueError`).
"""


class UserError(Exception):
  """A problem the user can fix; the message says what, where and what to do."""


class MissingDependencyError(UserError, ImportError):
  """An optional package a feature needs is not installed; the message names the pip command."""


class MissingPathError(UserError, FileNotFoundError):
  """A file or directory the user named does not exist (or lacks what it should hold)."""


class PathExistsError(UserError, FileExistsError):
  """A destination already holds something that would be overwritten; the message says how to proceed."""
