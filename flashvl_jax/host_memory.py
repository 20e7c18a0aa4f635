"""The host's peak resident memory of this process, for benchmarks."""

import resource


def peak_rss_gb() -> float:
  """Peak resident set size of this process so far, in GB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
