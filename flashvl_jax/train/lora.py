"""LoRA: low-rank trainable updates on chosen `nnx.Linear` layers, a switch to turn them off, and merging.

`add_lora(model, cfg)` turns every `nnx.Linear` whose dotted module path fully matches a `cfg.targets` regex
into a `LoRALinear` in place: the layer keeps its `kernel` / `bias` (same paths, so checkpoints and trainable
regexes still see them) and gains `lora_a [in, r]` and `lora_b [r, out]` (`nnx.LoRAParam`), so that

    y = x W + b + (alpha / r) * dropout(x) A B

`B` starts at zero, so a fresh adapter leaves the model unchanged. Training only the adapters is
`optimizer.trainable: ["\\.lora_(a|b)$"]`: frozen parameters get no gradient and no optimizer state.

Two trace-time switches (context variables, read when a function is traced; set them inside the jitted
function): `lora_enabled(False)` runs the base model, which DPO and GRPO use as the reference policy without
a second copy of the weights; `lora_dropout(key)` turns on adapter dropout (off otherwise, e.g. in evaluation
and sampling). `merge_lora(model)` folds the adapters into the kernels and returns a plain `FlashVLModel` with
exactly the base parameter paths, ready for `flashvl_jax.checkpoint.save_model` and `python -m convert export`.

Why not qwix (google/qwix `LoraProvider`, which tunix uses): it intercepts `dot_general` inside the one model
method it wraps (`__call__` of the top NNX module), so our sampler, which calls `embed_inputs` and `llm(...)`
with a KV cache, would silently decode without the adapters; it has no merge and no switch to run the base model,
needs an eager example forward (images and ids) to create the parameters, and draws dropout keys from a module
attribute that a functional, donated train step does not advance. The layer below is a few lines instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from flashvl_jax.config import ConfigError
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.sharding import logical_to_spec
from flashvl_jax.train.config import LoraConfig

LORA_TRAINABLE = r"\.lora_(a|b)$"  # the `optimizer.trainable` regex that trains the adapters only

_enabled = contextvars.ContextVar("lora_enabled", default=True)
_dropout_key = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def lora_enabled(enabled: bool) -> Iterator[None]:
  """Within the block, traced `LoRALinear`s add their update (True, the default) or act as the base layer."""
  token = _enabled.set(enabled)
  try:
    yield
  finally:
    _enabled.reset(token)


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None) -> Iterator[None]:
  """Within the block, traced `LoRALinear`s apply their dropout with keys folded from `key` (None: no dropout)."""
  token = _dropout_key.set(key)
  try:
    yield
  finally:
    _dropout_key.reset(token)


LORA_ATTRIBUTES = ("lora_a", "lora_b", "lora_scale", "lora_dropout_rate", "lora_index")


class LoRALinear(nnx.Linear):
  """`nnx.Linear` plus `(alpha / r) * dropout(x) @ lora_a @ lora_b`; made from an existing layer by `add_lora`."""

  lora_a: nnx.LoRAParam  # [in, r]
  lora_b: nnx.LoRAParam  # [r, out], zero at creation
  lora_scale: float  # alpha / r
  lora_dropout_rate: float
  lora_index: int  # folded into the dropout key, so every adapted layer drops its own units

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(x, out_sharding)
    if not _enabled.get():
      return y
    key = _dropout_key.get()
    if key is not None and self.lora_dropout_rate > 0:
      keep = 1.0 - self.lora_dropout_rate
      mask = jax.random.bernoulli(jax.random.fold_in(key, self.lora_index), keep, x.shape)
      x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    delta = jnp.matmul(jnp.matmul(x, a, precision=self.precision), b, precision=self.precision)
    return y + (self.lora_scale * delta).astype(y.dtype)

  def merged_kernel(self) -> jax.Array:
    """`W + (alpha / r) A B` in fp32, cast back to the kernel's dtype."""
    kernel = self.kernel[...]
    delta = jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + self.lora_scale * delta).astype(kernel.dtype)


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _lora_param(value: jax.Array, axes: tuple | None, like: jax.Array) -> nnx.LoRAParam:
  """A LoRA parameter with logical axes `axes`, placed on the mesh of `like` (the base kernel) when it has one."""
  sharding = getattr(like, "sharding", None) if not isinstance(like, jax.core.Tracer) else None
  if axes is not None and isinstance(sharding, jax.sharding.NamedSharding):
    spec = logical_to_spec(axes, value.shape, sharding.mesh)
    value = jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, spec))
  return nnx.LoRAParam(value, **({"out_sharding": axes} if axes is not None else {}))


def add_lora(model: nnx.Module, cfg: LoraConfig) -> list[str]:
  """Adds adapters in place to every `nnx.Linear` whose module path fully matches a target; returns those paths.

  Raises `ConfigError` when a target regex matches no linear layer (a typo would silently train nothing) or a
  matched layer already has an adapter.
  """
  regexes = [re.compile(t) for t in cfg.targets]
  linears = [(_name(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
  for regex in regexes:
    if not any(regex.fullmatch(name) for name, _ in linears):
      examples = ", ".join(name for name, _ in linears[:3])
      raise ConfigError(f"lora.targets regex {regex.pattern!r} matches no linear layer; module paths look like "
                        f"{examples}, ...")
  init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PyTorch LoRA's kaiming_uniform(a=sqrt(5))
  key = jax.random.key(cfg.seed)
  adapted = []
  for name, linear in linears:
    if not any(r.fullmatch(name) for r in regexes):
      continue
    if isinstance(linear, LoRALinear):
      raise ConfigError(f"{name} already has a LoRA adapter")
    kernel = linear.kernel.get_value()  # a ShapeDtypeStruct in an abstract model
    axes = linear.kernel.get_metadata().get("out_sharding")
    a = init_a(jax.random.fold_in(key, len(adapted)), (linear.in_features, cfg.rank), kernel.dtype)
    b = jnp.zeros((cfg.rank, linear.out_features), kernel.dtype)
    linear.__class__ = LoRALinear
    linear.lora_a = _lora_param(a, None if axes is None else (axes[0], None), kernel)
    linear.lora_b = _lora_param(b, None if axes is None else (None, axes[1]), kernel)
    linear.lora_scale = cfg.alpha / cfg.rank
    linear.lora_dropout_rate = cfg.dropout
    linear.lora_index = len(adapted)
    adapted.append(name)
  return adapted


def with_lora(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
  """`add_lora` as an expression: the same `model`, adapted (for `create_sharded(lambda: with_lora(...))`)."""
  add_lora(model, cfg)
  return model


def lora_param_count(model: nnx.Module) -> int:
  """Number of LoRA parameters (works on abstract models from `nnx.eval_shape`)."""
  return sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


def merge_lora(model: FlashVLModel) -> FlashVLModel:
  """A copy of `model` whose adapted layers are plain `nnx.Linear`s with `W + (alpha / r) A B` as kernel.

  The input model is left unchanged. The copy has exactly the base model's parameter paths, shapes, dtypes and
  shardings, so it saves and exports like a model that never had adapters.
  """
  merged = nnx.clone(model)
  for _, module in nnx.iter_modules(merged):
    if isinstance(module, LoRALinear):
      base = module.kernel.get_value()
      module.kernel = module.kernel.replace(jax.device_put(module.merged_kernel(), base.sharding))
      for name in LORA_ATTRIBUTES:
        delattr(module, name)
      module.__class__ = nnx.Linear
  return merged
