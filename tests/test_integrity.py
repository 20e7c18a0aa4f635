"""Checkpoints keep their promises (`flashvl_jax.integrity`): checksums written on save and verified on load, by
`convert inspect` and `convert export`; `--resume` falls back past a damaged newest step; an unwritable or full
destination fails fast with the path and errno and leaves no temporary folders."""

import contextlib
import errno
import json
import pathlib
import subprocess

import pytest
from flax import nnx

from convert.__main__ import main as convert_main
from flashvl_jax import checkpoint, integrity
from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.train.__main__ import main as train_main
from flashvl_jax.train.config import load_train_config
from flashvl_jax.train.trainer import train

QUICK = ["data.eval_size=0", "eval.accuracy=false"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "ck"
  checkpoint.save_model(path, FlashVLModel(load_config("tiny-static"), rngs=nnx.Rngs(0)))
  return path


def copy_of(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
  return dst


def largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x40
  path.write_bytes(bytes(data))


def test_saved_checkpoint_lists_every_file_and_loads(saved, capsys):
  listed = json.loads((saved / integrity.MANIFEST_FILE).read_text())["files"]
  on_disk = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
  assert set(listed) == on_disk - {integrity.MANIFEST_FILE, checkpoint.METADATA_FILE}
  assert any(name.startswith("params/") for name in listed) and "config.yaml" in listed
  checkpoint.load_model(saved)
  assert convert_main(["inspect", str(saved)]) == 0
  out = capsys.readouterr().out
  assert "load check: ok" in out and "data check: ok (" in out and "checksums match" in out


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_data_is_refused_by_load_inspect_and_export(saved, tmp_path, capsys, damage):
  ck = copy_of(saved, tmp_path / "ck")
  victim = largest_file(ck / checkpoint.PARAMS_DIR)
  if damage == "flip":
    flip_byte(victim)
  elif damage == "truncate":
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  else:
    victim.unlink()
  expected = {"flip": "checksum mismatch", "truncate": "truncated", "delete": "missing"}[damage]
  with pytest.raises(integrity.CorruptCheckpointError, match=expected):
    checkpoint.load_model(ck)
  for args in (["inspect", str(ck)], ["export", str(ck), "--out", str(tmp_path / "hf"), "--no-progress"]):
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and victim.name in err and expected in err and "Traceback" not in err
  assert not (tmp_path / "hf").exists()


def train_tiny(out, *overrides, resume=False):
  return train(load_train_config("tiny", [f"output_dir={out}", *QUICK, *overrides]), resume=resume)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
  out = tmp_path / "run"
  train_tiny(out, "steps=3", "checkpoint.every_steps=1", "checkpoint.keep=3")
  steps = out / "checkpoints"
  assert all(integrity.has_manifest(steps / str(s)) for s in (1, 2, 3))
  flip_byte(largest_file(steps / "3"))
  result = train_tiny(out, "steps=4", "checkpoint.every_steps=1", "checkpoint.keep=3", resume=True)
  printed = capsys.readouterr()
  assert "skipped damaged checkpoint step 3" in printed.out + printed.err
  assert "resumed from checkpoint step 2" in printed.out + printed.err
  assert result["step"] == 4 and (steps / "3.damaged").is_dir() and (steps / "4").is_dir()
  assert integrity.has_manifest(steps / "3") and integrity.has_manifest(steps / "4")  # step 3 trained again


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tmp_path, capsys):
  out = tmp_path / "run"
  train_tiny(out, "steps=1")
  flip_byte(largest_file(out / "checkpoints" / "1"))
  code = train_main(["tiny", f"output_dir={out}", *QUICK, "steps=2", "--resume"])
  err = capsys.readouterr().err
  assert code == 2 and "error: no checkpoint in" in err and "step 1:" in err and "checkpoint.restart=true" in err


def test_unwritable_output_fails_before_the_model_is_built(tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  code = train_main(["tiny", f"output_dir={tmp_path / 'a_file' / 'run'}", *QUICK, "steps=1"])
  err = capsys.readouterr().err
  assert code == 2 and "cannot write the output directory" in err and "a_file" in err and "ENOTDIR" in err
  with pytest.raises(integrity.NotWritableError) as info:
    integrity.probe_writable(tmp_path / "a_file" / "sub")
  assert info.value.errno == errno.ENOTDIR


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
  """A small tmpfs at `path` (needs root, as on this project's CI machines)."""
  path.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
  assert done.returncode == 0, f"mounting a tmpfs failed: {done.stderr}"
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_read_only_and_full_disks(saved, tmp_path, capsys):
  with tmpfs(tmp_path / "ro", "size=1M,ro") as ro:
    code = train_main(["tiny", f"output_dir={ro / 'run'}", *QUICK, "steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Read-only file system" in err and "EROFS" in err
  with tmpfs(tmp_path / "full", "size=256k") as full:  # the probe fits; the first checkpoint does not
    code = train_main(["tiny", f"output_dir={full / 'run'}", *QUICK, "steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err, err[-3000:]
    assert not list(full.rglob("*.orbax-checkpoint-tmp*")) and not list(full.rglob("*.incomplete"))
    assert convert_main(["export", str(saved), "--out", str(full / "hf"), "--no-progress"]) == 2
    assert "No space left on device" in capsys.readouterr().err and not list(full.glob("hf*"))
