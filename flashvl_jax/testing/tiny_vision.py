"""Tiny random SigLIP / AIMv2 Hugging Face checkpoints, the references for the vision-tower tests.

Every parameter is re-randomised (`randomize_`) so no term hides behind a 0 or 1 initialisation. Models are
fp32, in eval mode, with eager attention. Grids are 4x4 so a 2x2 pixel shuffle works on them.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

from flashvl_jax.testing.randomize import randomize_

TINY_SIGLIP = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)
TINY_SIGLIP_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                        max_position_embeddings=16, projection_size=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_AIMV2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7, use_head=False)


def tiny_siglip_config(use_head: bool = False, **overrides: Any):
  """A transformers `SiglipVisionConfig` of the tiny geometry (grid 4x4, D 64, 2 layers)."""
  from transformers import SiglipVisionConfig

  return SiglipVisionConfig(**{**TINY_SIGLIP, "vision_use_head": use_head, **overrides})


def _finish(model, out_dir: str | pathlib.Path, seed: int, embeddings=None, embed_scale: float = 1.0):
  import torch

  model.set_attn_implementation("eager")
  randomize_(model, seed)
  if embed_scale != 1.0:
    with torch.no_grad():
      for p in embeddings.parameters():
        p.mul_(embed_scale)
  model.eval()
  model.save_pretrained(str(out_dir))
  return model


def build_tiny_siglip(out_dir: str | pathlib.Path, *, seed: int = 0, use_head: bool = False, full_model: bool = False,
                      embed_scale: float = 1.0, **overrides: Any):
  """Writes a tiny random `SiglipVisionModel` (or a `SiglipModel` with a text tower when `full_model`) to
  `out_dir` with `save_pretrained`; returns the torch model.

  `embed_scale` multiplies the patch conv and position table after randomisation: hidden states of small
  variance are where a LayerNorm's eps matters.
  """
  from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

  vision = tiny_siglip_config(use_head, **overrides)
  if full_model:
    model = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config=TINY_SIGLIP_TEXT))
    embeddings = model.vision_model.embeddings
  else:
    model = SiglipVisionModel(vision)
    embeddings = model.embeddings
  return _finish(model, out_dir, seed, embeddings, embed_scale)


def tiny_aimv2_config(**overrides: Any):
  """A transformers `Aimv2VisionConfig` of the tiny geometry (grid 4x4, D 64, 2 layers, no head)."""
  from transformers import Aimv2VisionConfig

  return Aimv2VisionConfig(**{**TINY_AIMV2, **overrides})


def build_tiny_aimv2(out_dir: str | pathlib.Path, *, seed: int = 0, **overrides: Any):
  """Writes a tiny random transformers `Aimv2VisionModel` to `out_dir`; returns the torch model."""
  from transformers import Aimv2VisionModel

  return _finish(Aimv2VisionModel(tiny_aimv2_config(**overrides)), out_dir, seed)


def write_apple_layout(torch_model, out_dir: str | pathlib.Path) -> None:
  """Writes `torch_model`'s (an `Aimv2VisionModel`) weights in Apple's original remote-code layout, with a
  config.json as Apple's `AIMv2Config` spells it. Written from Apple's `modeling_aimv2.py` and the official
  conversion script (qkv rows are q; k; v), independently of our key tables."""
  import torch
  from safetensors.torch import save_file

  sd = {k: v.detach().contiguous() for k, v in torch_model.state_dict().items()}
  c = torch_model.config
  out = {
      "preprocessor.patchifier.proj.weight": sd["embeddings.patch_embed.weight"],
      "preprocessor.patchifier.proj.bias": sd["embeddings.patch_embed.bias"],
      "preprocessor.patchifier.norm.weight": sd["embeddings.rms_norm.weight"],
      "preprocessor.pos_embed": sd["embeddings.position_embedding.weight"][None],
      "trunk.post_trunk_norm.weight": sd["rms_norm.weight"],
  }
  for i in range(c.num_hidden_layers):
    hf, ap = f"encoder.layers.{i}", f"trunk.blocks.{i}"
    out[f"{ap}.norm_1.weight"] = sd[f"{hf}.rms_norm1.weight"]
    out[f"{ap}.attn.qkv.weight"] = torch.cat([sd[f"{hf}.attention.{n}_proj.weight"] for n in "qkv"], dim=0)
    out[f"{ap}.attn.proj.weight"] = sd[f"{hf}.attention.out_proj.weight"]
    out[f"{ap}.norm_2.weight"] = sd[f"{hf}.rms_norm2.weight"]
    out[f"{ap}.mlp.fc1.weight"] = sd[f"{hf}.ffn.gate_proj.weight"]
    out[f"{ap}.mlp.fc3.weight"] = sd[f"{hf}.ffn.up_proj.weight"]
    out[f"{ap}.mlp.fc2.weight"] = sd[f"{hf}.ffn.down_proj.weight"]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  config = {
      "architectures": ["AIMv2Model"],
      "model_type": "aimv2",
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_hidden_layers,
      "num_attention_heads": c.num_attention_heads,
      "num_channels": c.num_channels,
      "image_size": c.image_size,
      "patch_size": c.patch_size,
      "rms_norm_eps": c.rms_norm_eps,
      "attention_dropout": 0.0,
      "projection_dropout": 0.0,
      "qkv_bias": False,
      "use_bias": False,
      "torch_dtype": "float32",
  }
  (out_dir / "config.json").write_text(json.dumps(config, indent=2))


# Apple block keys -> transformers `encoder.layers.i.*` keys (the fused qkv is split separately).
APPLE_BLOCK_KEYS = {"norm_1.weight": "rms_norm1.weight", "attn.proj.weight": "attention.out_proj.weight",
                    "norm_2.weight": "rms_norm2.weight", "mlp.fc1.weight": "ffn.gate_proj.weight",
                    "mlp.fc3.weight": "ffn.up_proj.weight", "mlp.fc2.weight": "ffn.down_proj.weight"}
APPLE_OTHER_KEYS = {"preprocessor.patchifier.proj.weight": "embeddings.patch_embed.weight",
                    "preprocessor.patchifier.proj.bias": "embeddings.patch_embed.bias",
                    "preprocessor.patchifier.norm.weight": "embeddings.rms_norm.weight",
                    "trunk.post_trunk_norm.weight": "rms_norm.weight"}


def apple_to_transformers(state: dict[str, Any]) -> dict[str, Any]:
  """Apple remote-code AIMv2 tensors -> transformers `Aimv2VisionModel` keys: the inverse of
  `write_apple_layout` (qkv rows split in thirds q; k; v, `pos_embed` squeezed), independent of our tables."""
  out = {}
  for key, value in state.items():
    block = re.fullmatch(r"trunk\.blocks\.(\d+)\.(.+)", key)
    if key == "preprocessor.pos_embed":
      out["embeddings.position_embedding.weight"] = value[0]
    elif block and block.group(2) == "attn.qkv.weight":
      for name, part in zip("qkv", value.chunk(3, dim=0)):
        out[f"encoder.layers.{block.group(1)}.attention.{name}_proj.weight"] = part
    elif block:
      out[f"encoder.layers.{block.group(1)}.{APPLE_BLOCK_KEYS[block.group(2)]}"] = value
    else:
      out[APPLE_OTHER_KEYS[key]] = value
  return out


def aimv2_config_from_apple(config: dict[str, Any]):
  """A transformers `Aimv2VisionConfig` (no head) from Apple's `AIMv2Config` fields."""
  from transformers import Aimv2VisionConfig

  fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "rms_norm_eps", "qkv_bias")
  return Aimv2VisionConfig(**{k: config[k] for k in fields if k in config}, mlp_bias=config.get("use_bias", False),
                           use_head=False)


def read_apple_layout(path: str | pathlib.Path):
  """A transformers `Aimv2VisionModel` (fp32, eager, eval) holding an Apple-layout directory's weights."""
  from safetensors.torch import load_file
  from transformers import Aimv2VisionModel

  path = pathlib.Path(path)
  model = Aimv2VisionModel(aimv2_config_from_apple(json.loads((path / "config.json").read_text())))
  model.load_state_dict(apple_to_transformers(load_file(str(path / "model.safetensors"))), strict=True)
  model.set_attn_implementation("eager")
  return model.float().eval()


def reference_outputs(torch_model, pixels_nhwc, **kwargs) -> dict[str, Any]:
  """Runs an HF vision model on NHWC numpy pixels; returns numpy `pre_norm` (hidden_states[-1]),
  `post_norm` (last_hidden_state) and `pooler` (or None)."""
  import numpy as np
  import torch

  vision = getattr(torch_model, "vision_model", torch_model)  # SiglipModel -> its vision tower
  with torch.no_grad():
    out = vision(torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))), output_hidden_states=True,
                 **kwargs)
  pooler = out.pooler_output
  return dict(pre_norm=out.hidden_states[-1].numpy(), post_norm=out.last_hidden_state.numpy(),
              pooler=None if pooler is None else pooler.numpy())


def export_tensors(module, table) -> dict[str, Any]:
  """HF key -> numpy tensor for everything `table` exports from `module`'s parameters."""
  import numpy as np

  from flashvl_jax.weights.hf_io import param_arrays, param_shapes
  from flashvl_jax.weights.mapping import run_export

  arrays = param_arrays(module)
  return dict(run_export(table.plan_export(param_shapes(module)), lambda path: np.asarray(arrays[path])))


def random_pixels(seed: int, height: int, width: int, batch: int = 2):
  """Standard-normal NHWC float32 pixels (the range of normalised images, and beyond)."""
  import numpy as np

  return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def max_abs_diff(a, b) -> float:
  import numpy as np

  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
