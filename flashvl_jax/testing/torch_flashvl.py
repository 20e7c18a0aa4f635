"""A PyTorch Flash-VL reference built from the HF towers, for parity tests and `python -m flashvl_jax.parity`.

It is written independently of our JAX code: the pixel shuffle is InternVL's reshape/permute sequence, the
adapter is `p0 = Sequential(LayerNorm, Linear, GELU, Linear, GELU)` + `proj` as in the released remote code
(weights `adp.p0.{0,1,3}.*`, `adp.proj.*`), and image features overwrite the embedded placeholder positions
(`input_ids < 0`) in order, as the reference's `-200/-201` expansion does.
"""

from __future__ import annotations

import json
import pathlib

import torch
from torch import nn

from flashvl_jax.testing.randomize import randomize_


def internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
  """InternVL's pixel_shuffle on [N, h, w, C] (their code names the dims N, W, H, C)."""
  n, w, h, c = x.size()
  x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
  x = x.permute(0, 2, 1, 3).contiguous()
  x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
  if ps_version != "v1":
    x = x.permute(0, 2, 1, 3).contiguous()
  return x


class TorchAdapter(nn.Module):
  """LayerNorm(4C) -> Linear -> GELU -> Linear -> GELU -> proj (kind ln_mlp3), or Linear -> GELU -> Linear (mlp2)."""

  def __init__(self, vision_hidden: int, intermediate: int, llm_hidden: int, kind: str = "ln_mlp3"):
    super().__init__()
    d = vision_hidden * 4
    self.kind = kind
    if kind == "ln_mlp3":
      self.p0 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, intermediate), nn.GELU(), nn.Linear(intermediate, intermediate),
                              nn.GELU())
      self.proj = nn.Linear(intermediate, llm_hidden)
    else:
      self.p0 = nn.Sequential(nn.Linear(d, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))

  def forward(self, x):
    return self.proj(self.p0(x)) if self.kind == "ln_mlp3" else self.p0(x)


class TorchFlashVL(nn.Module):
  """vit (HF vision model) -> pixel shuffle -> adapter -> spliced into the embeddings of llm (Qwen2ForCausalLM)."""

  def __init__(self, vit: nn.Module, adp: TorchAdapter, llm: nn.Module, *, ps_version: str = "v2",
               vision_feature: str = "post_norm"):
    super().__init__()
    self.vit, self.adp, self.llm = vit, adp, llm
    self.ps_version = ps_version
    self.vision_feature = vision_feature

  def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised tiles [B, n, 3, H, W] (or one tile [B, 3, H, W]) -> adapter output [B, n * tokens, D].

    Each tile is pixel-shuffled on its own and the tiles' tokens are concatenated in order.
    """
    if pixel_values.ndim == 4:
      pixel_values = pixel_values[:, None]
    b, n = pixel_values.shape[:2]
    out = self.vit(pixel_values=pixel_values.flatten(0, 1), output_hidden_states=True)
    feats = out.last_hidden_state if self.vision_feature == "post_norm" else out.hidden_states[-1]
    _, p, c = feats.shape
    side = int(p**0.5)
    shuffled = internvl_pixel_shuffle(feats.reshape(b * n, side, side, c).contiguous(), ps_version=self.ps_version)
    return self.adp(shuffled.reshape(b, -1, c * 4))

  def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
    if pixel_values is None:
      return embeds
    feats = self.encode_images(pixel_values)  # one image per row
    embeds = embeds.clone()
    for b in range(input_ids.shape[0]):
      pos = torch.nonzero(input_ids[b] < 0).flatten()
      embeds[b, pos] = feats[b, :len(pos)].to(embeds.dtype)
    return embeds

  def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None):
    embeds = self.embed(input_ids, pixel_values)
    return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits


def build_tiny_flashvl(vit: nn.Module, llm: nn.Module, *, intermediate: int = 96, kind: str = "ln_mlp3",
                       seed: int = 0, **kwargs) -> TorchFlashVL:
  """A TorchFlashVL around given HF towers with a freshly randomised adapter (every parameter)."""
  adp = TorchAdapter(vit.config.hidden_size, intermediate, llm.config.hidden_size, kind=kind)
  randomize_(adp, seed)
  return TorchFlashVL(vit, adp, llm, **kwargs).eval()


def save_released_layout(model: TorchFlashVL, out_dir: str | pathlib.Path, *, image_token_num: int) -> pathlib.Path:
  """Writes `model` as a Flash-VL checkpoint in the released layout: `vit.*`, `adp.*`, `llm.*` + config.json."""
  from safetensors.torch import save_file

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  vit = model.vit
  tensors = {}
  for prefix, module in (("vit.", vit), ("adp.", model.adp), ("llm.", model.llm)):
    for k, v in module.state_dict().items():
      tensors[prefix + k] = v.detach().contiguous()  # no copy: safetensors writes from the tensors' memory
  if model.llm.config.tie_word_embeddings:
    tensors.pop("llm.lm_head.weight", None)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  vision_config = vit.config.to_dict()
  vision_config["proj_output_dim"] = model.llm.config.hidden_size
  cfg = {
      "architectures": ["FlashVL"],
      "model_type": "flashvl",
      "vision_config": vision_config,
      "llm_config": model.llm.config.to_dict(),
      "intermediate_size": model.adp.p0[1].out_features if model.adp.kind == "ln_mlp3" else None,
      "image_token_num": image_token_num,
  }
  (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
  return out


def load_released_layout(path: str | pathlib.Path) -> TorchFlashVL:
  """A `TorchFlashVL` (fp32, eager attention, eval) from a Flash-VL checkpoint in the released layout: config.json
  plus `model.safetensors` or a sharded set. An Apple-layout AIMv2 `vit.*` is mapped to transformers' keys."""
  from safetensors.torch import load_file
  from transformers import (Aimv2VisionConfig, Aimv2VisionModel, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig,
                            SiglipVisionModel)

  from flashvl_jax.testing.tiny_vision import aimv2_config_from_apple, apple_to_transformers

  path = pathlib.Path(path)
  cfg = json.loads((path / "config.json").read_text())
  index = path / "model.safetensors.index.json"
  files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
      "model.safetensors"]
  tensors = {k: v.float() for f in files for k, v in load_file(str(path / f)).items()}
  part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  vit_state = part("vit.")
  vision = {k: v for k, v in cfg["vision_config"].items() if k != "proj_output_dim"}
  if "siglip" in vision.get("model_type", ""):
    vit = SiglipVisionModel(SiglipVisionConfig(**vision))
  elif any(k.startswith("trunk.") for k in vit_state):
    vit, vit_state = Aimv2VisionModel(aimv2_config_from_apple(vision)), apple_to_transformers(vit_state)
  else:
    vit = Aimv2VisionModel(Aimv2VisionConfig(**vision))
  vit.load_state_dict(vit_state, strict=True)
  llm = Qwen2ForCausalLM(Qwen2Config(**cfg["llm_config"]))
  result = llm.load_state_dict(part("llm."), strict=False)
  tied_head = {"lm_head.weight"} if llm.config.tie_word_embeddings else set()
  if result.unexpected_keys or set(result.missing_keys) - tied_head:
    raise KeyError(f"llm.* keys do not match Qwen2ForCausalLM: missing {result.missing_keys}, unexpected "
                   f"{result.unexpected_keys}")
  adp_state = part("adp.")
  kind = "ln_mlp3" if "proj.weight" in adp_state else "mlp2"
  intermediate = adp_state["p0.1.weight"].shape[0] if kind == "ln_mlp3" else 0
  adp = TorchAdapter(vit.config.hidden_size, intermediate, llm.config.hidden_size, kind=kind)
  adp.load_state_dict(adp_state, strict=True)
  for tower in (vit, llm):
    tower.set_attn_implementation("eager")
  return TorchFlashVL(vit.float(), adp, llm.float()).eval()
