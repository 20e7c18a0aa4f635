"""`convert hf`: a Hugging Face safetensors directory -> a flashvl_jax model checkpoint (Orbax), tensor by tensor."""

from __future__ import annotations

import pathlib

import tqdm

from flashvl_jax import checkpoint
from flashvl_jax.weights.hf_io import param_dtypes, param_shapes
from flashvl_jax.weights.mapping import run_import


def progress_bar(total_bytes: int, desc: str, enabled: bool = True) -> tqdm.tqdm:
  """Bytes written so far (the postfix counts tensors)."""
  return tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def convert_hf(src: str | pathlib.Path, dst: str | pathlib.Path, *, dtype: str | None = None,
               overwrite: bool = False, progress: bool = True) -> pathlib.Path:
  """Converts the HF checkpoint at `src` into a model checkpoint at `dst`; returns `dst`.

  dtype: parameter dtype of the checkpoint (default: the source's, float32 if mixed). Only one tensor (plus a
  chunk of converted ones on their way to Orbax) is in memory at a time.
  """
  hf = checkpoint.open_hf(src)
  dtype = dtype or hf.default_param_dtype
  module = checkpoint.abstract_module(hf.architecture, hf.config, dtype)
  steps = hf.table.plan_import(hf.reader.shapes(), param_shapes(module), what=f"checkpoint {src}")
  total = sum(v.dtype.itemsize * v.size for _, v in checkpoint.flat_params(module).values())
  with progress_bar(total, f"{hf.architecture} -> {pathlib.Path(dst).name}", progress) as bar:
    return checkpoint.write_model(dst, module, run_import(steps, hf.reader.get, param_dtypes(module)), metadata=hf.metadata(),
                                  files=checkpoint.aux_files(src), overwrite=overwrite, progress=bar)
