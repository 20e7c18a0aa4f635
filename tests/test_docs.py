"""Every fenced ```python and ```bash block of README.md and docs/*.md, run as a user would run it.

The blocks run in order, in one directory (`testing.docs_workdir`) where each checkpoint and data file they name
exists as a tiny stand-in, so a command that needs an earlier one's output finds it. `python -m ...` commands run
as written, except where `EDITS` says how they are shortened (fewer steps, a tiny size); commands that need
hardware or a cluster this machine lacks have their configuration checked instead (`CONFIG_ONLY`). `pip install`
lines are checked against pyproject.toml. A block this file does not know how to run fails the test.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request


from flashvl_jax.testing.docs_workdir import TFDS_DATA_DIR, build_docs_workdir
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.data_sources import open_sources
from flashvl_jax.train.objectives import OBJECTIVES

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(python|bash)\n(.*?)```", re.S)
SHORT_TRAINING = ["steps=1", "global_batch_size=2", "data.max_length=320", "eval.every_steps=0", "data.eval_size=0",
                  "checkpoint.restart=true"]
# command prefix -> what is appended (a shortened run of the same command)
EDITS = {
    "python -m flashvl_jax.train stage": SHORT_TRAINING,
    "python -m flashvl_jax.train sft_lora": SHORT_TRAINING,
    "python -m flashvl_jax.train grpo": [*SHORT_TRAINING, "grad_accum_steps=1", "grpo.group_size=2",
                                         "grpo.max_new_tokens=2"],
    "python -m flashvl_jax.train": ["steps=2", "data.eval_size=8", "checkpoint.restart=true"],  # the demo
    "python -m flashvl_jax.bench --size full": ["--size", "tiny", "--variants", "static", "--new-tokens", "2",
                                               "--repeats", "1", "--batch-sizes", "2"],
    "python -m flashvl_jax.eval": ["--max-new-tokens", "2", "--max-seq-len", "512", "--no-progress"],
    "python -m flashvl_jax.bench --compile": ["--size", "tiny", "--variants", "static", "--depths", "1"],
    "python -m flashvl_jax.bench --rollouts": ["--prompts", "2", "--group-size", "2", "--new-tokens", "2",
                                              "--repeats", "1"],
    "python -m flashvl_jax.bench --serve": ["--clients", "1,2", "--requests-per-client", "1", "--baseline-requests",
                                           "1", "--new-tokens", "2", "--max-seq-len", "512"],
}
# substring -> why only the configuration is checked (load_train_config + data paths + init present)
CONFIG_ONLY = {
    "--compile-only --topology": "full-size TPU compiles take minutes each (tests/test_train_compile.py compiles)",
    "--coordinator-address": "needs a second host (tests/test_multihost.py runs two local processes)",
    "distributed.auto=true": "needs a TPU pod or a SLURM allocation",
    "--resume": "continues a full run (tests/test_train_resume.py resumes exactly)",
}
NOT_RUN = {"python -m pytest": "the test suite itself"}
INTERACTIVE = {"python -m flashvl_jax.chat ckpt/flashvl-2b-static --image cat.jpg": "/quit\n"}


def blocks():
  for doc in DOCS:
    for lang, body in FENCE.findall(doc.read_text()):
      yield doc.relative_to(REPO), lang, body


def commands(body: str) -> list[str]:
  """A bash block's commands: continued and quoted lines joined, comments and `[--optional]` dropped, `&&` split."""
  out, lines = [], []
  for line in body.replace("\\\n", " ").splitlines():  # a quoted argument may span lines (curl -d '{...}')
    if lines and lines[-1].count("'") % 2:
      lines[-1] += " " + line.strip()
    else:
      lines.append(line)
  for line in lines:
    line = re.sub(r"\s+#.*$", "", line).strip()
    if line and not line.startswith("#"):
      out += split_and(re.sub(r"\s\[--[^\]]*\]", "", line))
  return out


def split_and(line: str) -> list[str]:
  """`a && b` -> [a, b]; an `&&` inside quotes (`--command "cd x && python ..."`) stays."""
  parts, start, quote = [], 0, None
  for i, char in enumerate(line):
    if char in "'\"" and quote in (None, char):
      quote = None if quote else char
    elif quote is None and line.startswith("&&", i):
      parts.append(line[start:i])
      start = i + 2
  return [part.strip() for part in [*parts, line[start:]]]


def check_pip(command: str) -> None:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  for extras in re.findall(r"\.\[([\w,]+)\]", command):
    for extra in extras.split(","):
      assert extra in project["optional-dependencies"], f"{command}: no extra {extra!r} in pyproject.toml"
  pinned = re.search(r"torch==([\d.]+)", command)
  if pinned:
    assert f"torch=={pinned.group(1)}" in project["optional-dependencies"]["test"], command


def check_config(command: str, cwd: pathlib.Path) -> None:
  words = shlex.split(command[command.index("python -m flashvl_jax.train"):].strip('"'))[3:]
  name, overrides = words[0], [w for w in words[1:] if "=" in w and not w.startswith("-")]
  overrides = [o for o in overrides if not o.startswith("distributed.")]
  cfg = load_train_config(name, [o.replace("gs://...", "x.jsonl").replace("=N", "=2").replace("=i", "=0")
                                 for o in overrides])
  old = os.getcwd()
  os.chdir(cwd)
  try:
    open_sources(cfg.data, OBJECTIVES[cfg.objective].records)
    assert cfg.model.init is None or cfg.model.init == "CKPT" or pathlib.Path(cfg.model.init).exists(), command
  finally:
    os.chdir(old)


def run(command: str, cwd: pathlib.Path, env: dict[str, str], stdin: str | None = None) -> None:
  extra = next((args for prefix, args in EDITS.items() if command.startswith(prefix)), [])
  result = subprocess.run([*shlex.split(command), *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          input=stdin, timeout=300)
  assert result.returncode == 0, f"{command} {' '.join(extra)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


class Server:
  """`python -m flashvl_jax.serve ...` in the background for the blocks that talk to it."""

  def __init__(self, command: str, cwd: pathlib.Path, env: dict[str, str]):
    self.process = subprocess.Popen(shlex.split(command), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
      assert self.process.poll() is None, self.process.stderr.read()
      try:
        urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1)
        return
      except OSError:
        time.sleep(0.5)
    raise TimeoutError(command)

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(timeout=60)


def test_every_block_of_the_docs_runs(tmp_path):
  workdir = build_docs_workdir(tmp_path / "work")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",  # one device, as on a laptop
         "TFDS_DATA_DIR": str(workdir / TFDS_DATA_DIR)}
  eight = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # for the blocks that shard
  server, ran, done = None, [], set()
  try:
    for doc, lang, body in blocks():
      if lang == "python":
        uses_server = "127.0.0.1:8000" in body
        assert not uses_server or server is not None, f"{doc}: this block needs a server started by an earlier one"
        result = subprocess.run([sys.executable, "-c", body], cwd=workdir, env=eight, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{doc}:\n{body}\n{result.stderr[-3000:]}"
        ran.append(f"{doc}: python block")
        continue
      for command in commands(body):
        if command in done:
          continue  # a second doc repeating a step (it already ran; a rerun would refuse to overwrite)
        if command.startswith("pip install"):
          check_pip(command)
        elif any(key in command for key in NOT_RUN):
          pass
        elif any(key in command for key in CONFIG_ONLY):
          check_config(command, workdir)
        elif command.startswith("python -m flashvl_jax.serve "):
          if server is not None:
            server.stop()
          server = Server(command, workdir, env)
        elif command.startswith("curl"):
          assert server is not None, f"{doc}: {command} needs a server started by an earlier command"
          result = subprocess.run(command.replace("localhost:", "127.0.0.1:"), shell=True, cwd=workdir,
                                  capture_output=True, text=True, timeout=120)
          assert result.returncode == 0 and '"choices"' in result.stdout, f"{command}\n{result.stdout}"
        elif command.startswith(("python -m", "gcloud", "srun")):
          assert command.startswith("python -m"), f"{doc}: {command} can only be checked, add it to CONFIG_ONLY"
          run(command, workdir, env, INTERACTIVE.get(command))
        else:
          raise AssertionError(f"{doc}: tests/test_docs.py does not know how to run {command!r}")
        ran.append(f"{doc}: {command}")
        done.add(command)
  finally:
    if server is not None:
      server.stop()
  assert len(ran) > 40, ran
