"""Flax NNX modules: SigLIP and AIMv2 vision towers, the Qwen2 LM, the adapter and the Flash-VL composite.

Loading Hugging Face weights into them is `flashvl_jax.weights` (`weights.auto.from_hf(path)` for any of them).
"""
