"""flashvl_jax: Flash-VL 2B vision-language models in JAX / Flax NNX."""

from flax import nnx

# Parameters carry *logical* axis names that flashvl_jax.sharding.RULES resolves; placement is explicit
# (sharding.create_sharded), so Flax must not shard variables eagerly when they are created.
nnx.use_eager_sharding(False)

from flashvl_jax.api import FlashVL  # noqa: E402  (after the sharding switch)

__all__ = ["FlashVL"]
