"""A tiny random Hugging Face Qwen2ForCausalLM written to disk: the reference for parity tests.

Shapes: hidden 64, 2 layers, 4 q / 2 kv heads (head_dim 16,
GQA group 2), MLP 96, vocab 160, rope_theta 1e6. Every parameter is re-randomised (`randomize_`).
"""

from __future__ import annotations

import json
import pathlib

TINY_QWEN2 = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True)


def tiny_qwen2_config(**overrides):
  """The tiny `transformers.Qwen2Config` (eager attention, rope_theta 1e6); keyword overrides win."""
  from transformers import Qwen2Config

  kwargs = dict(TINY_QWEN2, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="eager")
  kwargs.update(overrides)
  return Qwen2Config(**kwargs)


def build_tiny_qwen2(out_dir: str | pathlib.Path, *, seed: int = 0, tied: bool = True, config_style: str = "v5"):
  """Builds, randomises and saves a tiny Qwen2ForCausalLM in `out_dir`; returns the torch model (fp32, eval).

  config_style "v5" keeps transformers 5's config.json (`rope_parameters`, `dtype`); "v4" rewrites it with
  the 4.x spellings (`rope_theta`, `rope_scaling: null`, `torch_dtype`) that released checkpoints use.
  """
  from transformers import Qwen2ForCausalLM

  from flashvl_jax.testing.randomize import randomize_

  if config_style not in ("v4", "v5"):
    raise ValueError(f"config_style must be 'v4' or 'v5', got {config_style!r}")
  model = Qwen2ForCausalLM(tiny_qwen2_config(tie_word_embeddings=tied))
  randomize_(model, seed)
  model.eval()
  out = pathlib.Path(out_dir)
  model.save_pretrained(out)
  if config_style == "v4":
    path = out / "config.json"
    hf = json.loads(path.read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope["rope_theta"]
    hf["rope_scaling"] = None
    hf["torch_dtype"] = hf.pop("dtype")
    hf.pop("layer_types", None)
    path.write_text(json.dumps(hf, indent=2))
  return model
