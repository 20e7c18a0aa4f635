"""Checkpoint conversion: `python -m convert` (also `flashvl-convert`).

  hf SRC --out DST        Hugging Face safetensors (a component or a released Flash-VL) -> Orbax model checkpoint
  export CKPT --out DIR   model checkpoint (or a training checkpoint step) -> Hugging Face safetensors + config.json
  inspect SRC             architecture, parameter count, dtypes, tensors and unmapped keys of either kind
  assemble --vision V --llm L --out DST   a new Flash-VL: vision + LLM checkpoints + a fresh adapter
  random --preset NAME --out DST   a Flash-VL of a preset's shapes with random weights (to try the tools)

The checkpoint format and the loaders are in `flashvl_jax.checkpoint`.
"""

from convert.assemble import assemble
from convert.export import export_checkpoint
from convert.hf_to_orbax import convert_hf
from convert.inspect_cmd import inspect_path
from convert.random_cmd import write_random

__all__ = ["assemble", "convert_hf", "export_checkpoint", "inspect_path", "write_random"]
