"""Adapter weights in the released Flash-VL layout (`p0 = Sequential(LayerNorm, Linear, GELU, Linear, GELU)`, `proj`)."""

from __future__ import annotations

from flashvl_jax.config import AdapterConfig
from flashvl_jax.weights.mapping import Table, linear_rules, norm_rules


def table(cfg: AdapterConfig) -> Table:
  if cfg.kind == "ln_mlp3":
    layers = {"p0.1": "linear_1", "p0.3": "linear_2", "proj": "proj"}
    rules = norm_rules("p0.0", "norm")
  else:  # mlp2: Sequential(Linear, GELU, Linear)
    layers = {"p0.0": "linear_1", "p0.2": "linear_2"}
    rules = []
  for hf, ours in layers.items():
    rules += linear_rules(hf, ours)
  return Table(rules, f"adapter[{cfg.kind}]")
