"""A `python -m flashvl_jax.serve` child process on 127.0.0.1 and a free port, for benchmarks and tests."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import threading

import httpx


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


class ServerProcess:
  """Starts the server on `checkpoint` with extra CLI `args` and waits (up to `timeout` s) until it is ready.

  `lines` collects its output; `url` is `http://127.0.0.1:PORT`; `metric(name)` reads one Prometheus sample.
  """

  def __init__(self, checkpoint: str | os.PathLike, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    cmd = [sys.executable, "-m", "flashvl_jax.serve", str(pathlib.Path(checkpoint)), "--port", str(self.port), *args]
    self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._ready = threading.Event()
    threading.Thread(target=self._read, daemon=True).start()
    if not self._ready.wait(timeout) or self.proc.poll() is not None:
      self.proc.kill()
      raise RuntimeError("the server did not become ready:\n" + "".join(self.lines[-40:]))

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line)
      if line.startswith("ready: "):
        self._ready.set()
    self._ready.set()  # exited: let the waiter see it

  def metric(self, name: str) -> float:
    text = httpx.get(self.url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
