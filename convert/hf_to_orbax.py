"""`convert hf`: a Hugging Face safetensors directory -> a flashvl_jax model checkpoint (Orbax), tensor by tensor."""

from __future__ import annotations

import dataclasses
import pathlib

import tqdm

from flashvl_jax import checkpoint
from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.weights.hf_io import param_dtypes, param_shapes
from flashvl_jax.weights.mapping import run_import


def progress_bar(total_bytes: int, desc: str, enabled: bool = True) -> tqdm.tqdm:
  """Bytes written so far (the postfix counts tensors)."""
  return tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def choose_tiling(hf: checkpoint.HFCheckpoint, preset: str | None, tiling: str | None) -> checkpoint.HFCheckpoint:
  """`hf` with the tiling of `preset` (whose shapes must be the checkpoint's) and/or the mode `tiling`."""
  if preset is None and tiling is None:
    return hf
  if hf.architecture != "flashvl":
    raise ConfigError(f"--preset / --tiling apply to a Flash-VL checkpoint; {hf.path} holds a {hf.architecture!r} model")
  cfg = hf.config
  if preset is not None:
    base = load_config(preset)
    theirs = param_shapes(checkpoint.abstract_module("flashvl", base, "float32"))
    if theirs != param_shapes(checkpoint.abstract_module("flashvl", cfg, "float32")):
      raise ConfigError(f"preset {preset!r} does not have the shapes of {hf.path} (a different vision tower, adapter "
                        "or LLM size); choose the preset of that checkpoint, or only --tiling")
    cfg = dataclasses.replace(cfg, tiling=base.tiling, vision_feature=base.vision_feature)
  if tiling is not None:
    cfg = dataclasses.replace(cfg, tiling=dataclasses.replace(cfg.tiling, mode=tiling))
  return dataclasses.replace(hf, config=cfg)


def convert_hf(src: str | pathlib.Path, dst: str | pathlib.Path, *, dtype: str | None = None,
               preset: str | None = None, tiling: str | None = None, overwrite: bool = False,
               progress: bool = True) -> pathlib.Path:
  """Converts the HF checkpoint at `src` into a model checkpoint at `dst`; returns `dst`.

  dtype: parameter dtype of the checkpoint (default: the source's, float32 if mixed). Only one tensor (plus a
  chunk of converted ones on their way to Orbax) is in memory at a time.
  preset, tiling: a released Flash-VL's tiling, from a model preset of its shapes and/or a mode (static, dynamic,
  overlap, iss); without them it is inferred from the checkpoint (SigLIP: static; AIMv2: iss when
  `image_token_num` is 576, else dynamic). The checkpoint records it in config.yaml.
  """
  checkpoint.check_destination(dst, overwrite=overwrite)
  hf = choose_tiling(checkpoint.open_hf(src), preset, tiling)
  dtype = dtype or hf.default_param_dtype
  module = checkpoint.abstract_module(hf.architecture, hf.config, dtype)
  carried = hf.carried_tensors(dtype)  # small (a SigLIP head): read up front
  steps = hf.table.plan_import(hf.reader.shapes(), param_shapes(module), what=f"checkpoint {src}")
  total = sum(v.dtype.itemsize * v.size for _, v in checkpoint.flat_params(module).values())
  with progress_bar(total, f"{hf.architecture} -> {pathlib.Path(dst).name}", progress) as bar:
    tensors = run_import(steps, hf.reader.get, param_dtypes(module))
    return checkpoint.write_model(dst, module, tensors, metadata=hf.metadata(), files=checkpoint.aux_files(src),
                                  carried=carried, overwrite=overwrite, progress=bar)
