"""`convert assemble`: a new Flash-VL from a vision checkpoint, an LLM checkpoint and a freshly initialised adapter.

The starting point of stage-1 training (adapter only). The adapter's shape comes from a model preset
(`--preset flashvl-2b-static`) or the defaults, its width optionally from `--adapter-width`; tiling from the
preset, `--tiling`, or by tower (SigLIP: static, AIMv2: dynamic with a thumbnail).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import numpy as np
from flax import nnx

from convert.hf_to_orbax import progress_bar
from flashvl_jax import checkpoint
from flashvl_jax.config import AdapterConfig, ConfigError, FlashVLConfig, TilingConfig, load_config
from flashvl_jax.models.adapter import Adapter
from flashvl_jax.models.layers import to_dtype
from flashvl_jax.preprocess.tiling import max_image_tokens
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights.hf_io import param_dtypes, param_shapes
from flashvl_jax.weights.mapping import run_import


def default_tiling(kind: str) -> TilingConfig:
  return TilingConfig(mode="static") if kind == "siglip" else TilingConfig(mode="dynamic", thumbnail=True)


def assembled_config(vision: checkpoint.HFCheckpoint, llm: checkpoint.HFCheckpoint, *, preset: str | None,
                     tiling: str | None, adapter_width: int | None, dtype: str) -> FlashVLConfig:
  base = load_config(preset) if preset else None
  kind = vision.config.kind
  if base is not None and base.vision.kind != kind:
    raise ConfigError(f"preset {preset!r} expects a {base.vision.kind!r} vision tower, but {vision.path} is {kind!r}")
  adapter = base.adapter if base is not None else AdapterConfig()
  if adapter_width is not None:
    adapter = dataclasses.replace(adapter, intermediate_size=adapter_width)
  tiling_cfg = base.tiling if base is not None else default_tiling(kind)
  if tiling is not None:
    tiling_cfg = dataclasses.replace(tiling_cfg, mode=tiling)
  return FlashVLConfig(name=preset or f"flashvl-{kind}-qwen2",
                       vision=dataclasses.replace(vision.config, use_head=False), adapter=adapter, llm=llm.config,
                       tiling=tiling_cfg,
                       vision_feature=base.vision_feature if base is not None else "post_norm", dtype=dtype,
                       param_dtype=dtype)


def assemble(vision_path: str | pathlib.Path, llm_path: str | pathlib.Path, out: str | pathlib.Path, *,
             preset: str | None = None, tiling: str | None = None, adapter_width: int | None = None,
             dtype: str | None = None, seed: int = 0, overwrite: bool = False, progress: bool = True) -> pathlib.Path:
  """Writes a Flash-VL model checkpoint at `out`: `vit` from `vision_path` (SigLIP or AIMv2, any layout; a SigLIP
  pooling head is dropped), `llm` from `llm_path` (Qwen2), `adp` initialised with `seed`. Tokenizer files come
  from the LLM directory, preprocessor_config.json from the vision one."""
  checkpoint.check_destination(out, overwrite=overwrite)
  vision, llm = checkpoint.open_hf(vision_path), checkpoint.open_hf(llm_path)
  if vision.architecture not in ("siglip", "aimv2"):
    raise ConfigError(f"--vision {vision_path} holds a {vision.architecture!r} model; expected SigLIP or AIMv2")
  if llm.architecture != "qwen2":
    raise ConfigError(f"--llm {llm_path} holds a {llm.architecture!r} model; expected Qwen2ForCausalLM")
  if dtype is None:
    dtypes = {vision.default_param_dtype, llm.default_param_dtype}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
  cfg = assembled_config(vision, llm, preset=preset, tiling=tiling, adapter_width=adapter_width, dtype=dtype)
  module = checkpoint.abstract_module("flashvl", cfg, None)
  shapes = param_shapes(module)
  part = lambda prefix: {k: s for k, s in shapes.items() if k.startswith(prefix)}
  vision_table = checkpoint.VISION_WEIGHTS[cfg.vision.kind].checkpoint_table(cfg.vision, vision.reader.keys())
  vision_steps = vision_table.with_prefix("", "vit.").plan_import(vision.reader.shapes(), part("vit."),
                                                                  what=f"vision checkpoint {vision_path}")
  llm_steps = qwen2_weights.table(cfg.llm).with_prefix("", "llm.").plan_import(llm.reader.shapes(), part("llm."),
                                                                             what=f"LLM checkpoint {llm_path}")
  # One jitted initialisation instead of one compilation per initializer call.
  adapter = nnx.jit(lambda: Adapter(cfg.adapter, cfg.vision.hidden_size, cfg.llm.hidden_size, dtype=to_dtype(dtype),
                                    param_dtype=to_dtype(dtype), rngs=nnx.Rngs(seed)))()
  adapter_tensors = [(f"adp.{name}", np.asarray(value)) for name, (_, value) in checkpoint.flat_params(adapter).items()]
  dtypes = param_dtypes(module)
  tensors = itertools.chain(run_import(vision_steps, vision.reader.get, dtypes), adapter_tensors,
                            run_import(llm_steps, llm.reader.get, dtypes))
  metadata = {"source": {"vision": str(vision.path), "llm": str(llm.path)},
              "source_dtype": {"vision": vision.source_dtype, "llm": llm.source_dtype}, "hf_layout": vision.layout,
              "tied": cfg.llm.tie_word_embeddings, "image_token_num": max_image_tokens(cfg), "adapter_seed": seed}
  files = [f for f in checkpoint.aux_files(llm.path) if f.name != "preprocessor_config.json"]
  files += [f for f in checkpoint.aux_files(vision.path) if f.name == "preprocessor_config.json"]
  total = sum(int(np.prod(s)) for s in shapes.values()) * to_dtype(dtype).itemsize
  with progress_bar(total, f"assemble -> {pathlib.Path(out).name}", progress) as bar:
    return checkpoint.write_model(out, module, tensors, metadata=metadata, files=files, overwrite=overwrite,
                                  progress=bar)
