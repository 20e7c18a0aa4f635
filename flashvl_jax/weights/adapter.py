"""Adapter weights in the released Flash-VL layout (`p0 = Sequential(LayerNorm, Linear, GELU, Linear, GELU)`, `proj`)."""

from __future__ import annotations

from flashvl_jax.config import AdapterConfig
from flashvl_jax.weights.mapping import LINEAR, Rule, Table


def table(cfg: AdapterConfig) -> Table:
  if cfg.kind == "ln_mlp3":
    layers = {"p0.1": "linear_1", "p0.3": "linear_2", "proj": "proj"}
    rules = [Rule("p0.0.weight", "norm.scale"), Rule("p0.0.bias", "norm.bias")]
  else:  # mlp2: Sequential(Linear, GELU, Linear)
    layers = {"p0.0": "linear_1", "p0.2": "linear_2"}
    rules = []
  for hf, ours in layers.items():
    rules += [Rule(f"{hf}.weight", f"{ours}.kernel", LINEAR), Rule(f"{hf}.bias", f"{ours}.bias")]
  return Table(rules, f"adapter[{cfg.kind}]")
