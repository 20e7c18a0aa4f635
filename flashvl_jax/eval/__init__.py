"""Benchmark evaluation: `python -m flashvl_jax.eval CKPT --data FILE ...` (docs/evaluation.md)."""
