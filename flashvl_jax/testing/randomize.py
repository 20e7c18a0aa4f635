"""Re-randomise every parameter of a PyTorch model so no term can hide behind a 0 or 1 initialisation."""

from __future__ import annotations

import math


def randomize_(model, seed: int = 0) -> None:
  """In place: 1-D weights (norm scales) ~ 1 ± 0.2, biases ~ N(0, 0.1), tables ~ N(0, 0.5),
  matrices ~ N(0, 1/fan_in) so activations stay O(1) through the network."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      shape, dtype = p.shape, p.dtype
      if name.endswith("bias") or name.endswith("_bias"):
        new = torch.randn(shape, generator=gen) * 0.1
      elif p.ndim == 1:
        new = 1.0 + (torch.rand(shape, generator=gen) * 2 - 1) * 0.2
      elif "embed" in name and p.ndim == 2 and "patch" not in name:
        new = torch.randn(shape, generator=gen) * 0.5  # token / position tables
      else:
        fan_in = math.prod(shape[1:]) if p.ndim > 1 else shape[0]
        new = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
      p.copy_(new.to(dtype))
