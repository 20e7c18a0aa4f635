"""`python -m convert random --preset NAME --out DIR`: a Flash-VL of a preset's shapes with random weights.

For trying the tools (chat, serve, export, train `model.init`) without real weights; no PyTorch needed. The
default writes an Orbax model checkpoint; `--hf` writes the released Hugging Face layout instead (through
`convert export`).
"""

from __future__ import annotations

import pathlib
import tempfile

from flax import nnx

from convert.export import check_export_destination, export_checkpoint
from flashvl_jax import checkpoint
from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel


def write_random(preset: str, out: str | pathlib.Path, *, dtype: str = "float32", seed: int = 0, hf: bool = False,
                 overwrite: bool = False, progress: bool = True) -> pathlib.Path:
  """Writes a random Flash-VL of `preset` (a name in configs/models/ or a YAML path) to `out`."""
  if hf:
    check_export_destination(out, overwrite=overwrite)
  else:
    checkpoint.check_destination(out, overwrite=overwrite)
  cfg = load_config(preset, [f"param_dtype={dtype}", f"dtype={dtype}"])
  model = FlashVLModel(cfg, rngs=nnx.Rngs(seed))
  metadata = {"source": f"random weights (preset {preset}, seed {seed})"}
  if not hf:
    return checkpoint.save_model(out, model, metadata=metadata, overwrite=overwrite)
  with tempfile.TemporaryDirectory(prefix="flashvl_random_") as tmp:
    checkpoint.save_model(pathlib.Path(tmp) / "orbax", model, metadata=metadata)
    return export_checkpoint(pathlib.Path(tmp) / "orbax", out, overwrite=overwrite, progress=progress)
