"""`convert inspect`: what a Hugging Face directory or a model checkpoint holds, and what our tables do not map."""

from __future__ import annotations

import collections
import pathlib

import numpy as np

from convert.export import export_table
from flashvl_jax import checkpoint
from flashvl_jax.config import ConfigError
from flashvl_jax.weights.hf_io import CheckpointError, SafetensorsReader, param_shapes, read_hf_config
from flashvl_jax.weights.mapping import WeightMappingError


def _summary(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> list[str]:
  count = sum(int(np.prod(s)) for s in shapes.values())
  by_dtype = collections.Counter(dtypes.values())
  return [f"parameters: {count:,} in {len(shapes)} tensors",
          "dtypes: " + ", ".join(f"{d} x{n}" for d, n in sorted(by_dtype.items()))]


def _section(title: str, items: list[str]) -> list[str]:
  return [f"{title} ({len(items)}):" if items else f"{title}: none"] + [f"  {x}" for x in items]


def inspect_hf(path: pathlib.Path) -> list[str]:
  reader = SafetensorsReader(path)
  keys = reader.keys()
  shapes = reader.shapes()
  dtypes = {k: checkpoint.SAFETENSORS_DTYPES.get(reader.dtype(k), reader.dtype(k)) for k in keys}
  lines = [f"{path}: Hugging Face checkpoint"]
  try:
    hf = checkpoint.open_hf(path)
  except (CheckpointError, ConfigError, WeightMappingError) as e:
    hf = None
    cfg = read_hf_config(path)
    lines.append(f"architecture: not convertible ({e})")
    lines.append(f"config.json: model_type={cfg.get('model_type')!r}, architectures={cfg.get('architectures')}")
  if hf is not None:
    lines.append(f"architecture: {hf.architecture} ({', '.join(hf.hf_config.get('architectures') or ['?'])})")
    if hf.layout:
      lines.append(f"layout: {hf.layout}")
    meta = hf.metadata()
    if "tied" in meta:
      lines.append(f"tied embeddings: {meta['tied']}")
  lines += _summary(shapes, dtypes)
  lines.append("tensors:")
  unmapped = []
  for k in keys:
    found = hf.table.match_hf(k) if hf is not None else None
    if found is None:
      unmapped.append(k)
    carried = hf is not None and k in hf.carried_keys
    target = "UNMAPPED" if found is None else "mapped" if found[0].ours is not None else "carried" if carried else "dropped"
    lines.append(f"  {k} {list(shapes[k])} {dtypes[k]} {target}")
  lines += _section("keys our tables do not map", unmapped)
  if hf is not None:
    module = checkpoint.abstract_module(hf.architecture, hf.config, "float32")
    try:
      hf.table.plan_import(shapes, param_shapes(module), what=str(path))
      lines.append("conversion check: ok (every parameter provided, every shape matches)")
    except WeightMappingError as e:
      lines.append(f"conversion check: FAILS\n{e}")
  return lines


def inspect_checkpoint(path: pathlib.Path) -> list[str]:
  info = checkpoint.read_info(path)
  saved = checkpoint.saved_params(info.path)
  shapes = {k: tuple(m.shape) for k, m in saved.items()}
  dtypes = {k: np.dtype(m.dtype).name for k, m in saved.items()}
  meta = info.metadata
  lines = [f"{info.path}: flashvl_jax model checkpoint (format {meta['format_version']})",
           f"architecture: {info.architecture}"]
  lines += [f"{key}: {meta[key]}" for key in ("hf_layout", "tied", "source", "source_dtype") if key in meta]
  lines += _summary(shapes, dtypes)
  hf_keys = {}
  problems = []
  try:
    for step in export_table(info).plan_export(shapes):
      hf_keys.update({p: step.hf_key if step.index is None else step.rule.hf for p in step.our_paths})
  except WeightMappingError as e:
    problems.append(str(e))
  lines.append("tensors:")
  lines += [f"  {k} {list(shapes[k])} {dtypes[k]} -> {hf_keys.get(k, 'UNMAPPED')}" for k in sorted(shapes)]
  lines += _section("parameters our tables do not map", sorted(set(shapes) - set(hf_keys)))
  lines += _section("carried source tensors (unused by the model, written back by export)",
                    meta.get("carried_keys") or [])
  try:
    module = checkpoint.abstract_module(info.architecture, info.config, info.param_dtype)
    checkpoint.check_saved_params(info.path, module)
  except WeightMappingError as e:
    problems.append(str(e))
  lines.append("load check: " + ("ok (names, shapes and dtypes)" if not problems else
                                  "FAILS\n" + "\n".join(problems)))
  lines.append("data check: " + checkpoint.data_check(info.path))
  return lines


def inspect_path(path: str | pathlib.Path) -> str:
  """A report on an HF directory or a model checkpoint: architecture, parameter
  count, dtypes, every tensor, and every key our tables do not map."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path} does not exist")
  lines = inspect_hf(path) if checkpoint.is_hf_directory(path) else inspect_checkpoint(path)
  return "\n".join(lines)
