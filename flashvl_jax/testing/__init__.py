"""Tiny random Hugging Face reference checkpoints and PyTorch references (needs the `test` extra: torch)."""
