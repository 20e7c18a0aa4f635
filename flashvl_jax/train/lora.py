"""LoRA: low-rank trainable updates on chosen `Linear` layers, a switch to turn them off, and merging.

`add_lora(model, cfg)` gives every `layers.Linear` whose dotted module path fully matches a `cfg.targets` regex
a `LoRA` module as its `lora` option: the layer keeps its `kernel` / `bias` (same paths, so checkpoints and
trainable regexes still see them) and gains `lora.lora_a [in, r]` and `lora.lora_b [r, out]` (`nnx.LoRAParam`,
with a leading [L] axis inside stacked layers), so that

    y = x W + b + (alpha / r) * dropout(x) A B

`B` starts at zero, so a fresh adapter leaves the model unchanged. Training only the adapters is
`optimizer.trainable: ["\\.lora_(a|b)$"]`: frozen parameters get no gradient and no optimizer state.

Two switches, module attributes set with `set_lora` on the model a traced function is about to run (right after
its `nnx.merge`): `enabled=False` runs the base model, which DPO and GRPO use as the reference policy without a
second copy of the weights; `dropout_key=key` turns on adapter dropout (off as built, e.g. in evaluation and
sampling). `merge_lora(model)` folds the adapters into the kernels and returns a plain `FlashVLModel` with
exactly the base parameter paths, ready for `flashvl_jax.checkpoint.save_model` and `python -m convert export`.

Why not qwix (google/qwix `LoraProvider`, which tunix uses): it intercepts `dot_general` inside the one model
method it wraps (`__call__` of the top NNX module), so our sampler, which calls `embed_inputs` and `llm(...)`
with a KV cache, would silently decode without the adapters; it has no merge and no switch to run the base model,
needs an eager example forward (images and ids) to create the parameters, and draws dropout keys from a module
attribute that a functional, donated train step does not advance. The layer below is a few lines instead.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashvl_jax.config import ConfigError
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.layers import Linear
from flashvl_jax.sharding import logical_to_spec
from flashvl_jax.train.config import LoraConfig

LORA_TRAINABLE = r"\.lora_(a|b)$"  # the `optimizer.trainable` regex that trains the adapters only

class LoRAIndex(nnx.Variable):
  """Integer id(s) of an adapter, folded into its dropout key (one per layer when stacked)."""


class LoRA(nnx.Module):
  """`(alpha / r) * dropout(x) @ lora_a @ lora_b`: the update `add_lora` attaches to a `Linear` as its `lora`.

  For a linear inside stacked layers, `lora_a` [L, in, r], `lora_b` [L, r, out] and `index` [L] are stacked the
  same way and the scan hands each layer its slice.
  """

  def __init__(self, lora_a: nnx.LoRAParam, lora_b: nnx.LoRAParam, index: jax.Array, *, scale: float,
               dropout_rate: float, dtype, precision):
    self.lora_a = lora_a
    self.lora_b = lora_b
    self.index = LoRAIndex(index)
    self.scale = scale
    self.dropout_rate = dropout_rate
    self.dtype = dtype
    self.precision = precision
    self.enabled = True  # `set_lora` switches
    self.dropout_key: jax.Array | None = nnx.data(None)  # shaped like `index` when set

  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.enabled:
      return jnp.zeros((*x.shape[:-1], self.lora_b.shape[-1]), x.dtype)
    if self.dropout_key is not None and self.dropout_rate > 0:
      keep = 1.0 - self.dropout_rate
      mask = jax.random.bernoulli(self.dropout_key, keep, x.shape)
      x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    dtype = self.dtype or x.dtype
    x, a, b = x.astype(dtype), self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
    delta = jnp.matmul(jnp.matmul(x, a, precision=self.precision), b, precision=self.precision)
    return self.scale * delta

  def delta_kernel(self) -> jax.Array:
    """`(alpha / r) A B` in fp32, [..., in, out] (stacked like the kernel)."""
    a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
    return self.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def set_lora(model: nnx.Module, *, enabled: bool = True, dropout_key: jax.Array | None = None) -> None:
  """Sets every adapter in `model` on or off (off: the base model) and its dropout key (None: no dropout; each
  adapter, and each layer of a stacked one, folds in its own index). Call it on the module a traced function is
  about to run, e.g. right after `nnx.merge`: the attributes are read when the adapters are traced."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRA):
      module.enabled = enabled
      if dropout_key is None:
        module.dropout_key = None
      else:
        index = module.index[...]
        keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(index.reshape(-1))
        module.dropout_key = keys.reshape(index.shape)


def _name(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _on_mesh_of(value: jax.Array, like: jax.Array, axes: tuple | None) -> jax.Array:
  """`value` placed on the mesh of `like` (the base kernel) by its logical `axes` (None: replicated), when `like`
  has a mesh; as it is otherwise (an abstract or unsharded model)."""
  sharding = getattr(like, "sharding", None) if not isinstance(like, jax.core.Tracer) else None
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return value
  spec = logical_to_spec(axes, value.shape, sharding.mesh) if axes is not None else jax.sharding.PartitionSpec()
  return jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, spec))


def _lora_param(value: jax.Array, axes: tuple | None, like: jax.Array) -> nnx.LoRAParam:
  """A LoRA parameter with logical axes `axes`, on the mesh of `like`."""
  return nnx.LoRAParam(_on_mesh_of(value, like, axes), **({"out_sharding": axes} if axes is not None else {}))


def _no_match_hint(pattern: str, names: list[str]) -> str:
  hint = ""
  if r"\d" in pattern and "layers" in pattern:
    hint = (" Layers are stacked, so module paths carry no layer index (one path, e.g. "
            "llm.model.layers.self_attn.q_proj, adapts every layer); drop the index from the regex.")
  return (f"lora.targets regex {pattern!r} matches no linear layer; module paths look like "
          f"{', '.join(names[:3])}, ...{hint}")


def add_lora(model: nnx.Module, cfg: LoraConfig) -> list[str]:
  """Attaches an adapter in place to every `Linear` whose module path fully matches a target; returns those paths.

  A linear inside stacked layers gets a stacked adapter (every layer adapted, each with its own A, B and dropout).
  Raises `ConfigError` when a target regex matches no linear layer (a typo would silently train nothing) or a
  matched layer already has an adapter.
  """
  regexes = [re.compile(t) for t in cfg.targets]
  linears = [(_name(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]
  names = [name for name, _ in linears]
  for regex in regexes:
    if not any(regex.fullmatch(name) for name in names):
      raise ConfigError(_no_match_hint(regex.pattern, names))
  key = jax.random.key(cfg.seed)
  adapted, count = [], 0
  for name, linear in linears:
    if not any(r.fullmatch(name) for r in regexes):
      continue
    if linear.lora is not None:
      raise ConfigError(f"{name} already has a LoRA adapter")
    kernel = linear.kernel.get_value()  # a ShapeDtypeStruct in an abstract model
    layers = tuple(kernel.shape[:-2])  # (L,) when stacked, () otherwise
    axes = linear.kernel.get_metadata().get("out_sharding")
    # PyTorch LoRA's kaiming_uniform(a=sqrt(5)) on each layer's [in, r] matrix.
    init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                               batch_axis=tuple(range(len(layers))))
    a = init_a(jax.random.fold_in(key, len(adapted)), (*layers, linear.in_features, cfg.rank), kernel.dtype)
    b = jnp.zeros((*layers, cfg.rank, linear.out_features), kernel.dtype)
    size = int(np.prod(layers, dtype=np.int64))
    index = jnp.arange(count, count + size, dtype=jnp.int32).reshape(layers)
    count += size
    linear.lora = LoRA(_lora_param(a, None if axes is None else (*axes[:-1], None), kernel),
                       _lora_param(b, None if axes is None else (*axes[:-2], None, axes[-1]), kernel),
                       _on_mesh_of(index, kernel, None),
                       scale=cfg.alpha / cfg.rank, dropout_rate=cfg.dropout, dtype=linear.dtype,
                       precision=linear.precision)
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
  """A copy of `model` whose adapted layers are plain `Linear`s with `W + (alpha / r) A B` as kernel.

  The input model is left unchanged. The copy has exactly the base model's parameter paths, shapes, dtypes and
  shardings, so it saves and exports like a model that never had adapters.
  """
  merged = nnx.clone(model)
  for _, module in nnx.iter_modules(merged):
    if isinstance(module, Linear) and module.lora is not None:
      base = module.kernel.get_value()
      kernel = (base.astype(jnp.float32) + module.lora.delta_kernel()).astype(base.dtype)
      module.kernel = module.kernel.replace(jax.device_put(kernel, base.sharding))
      module.lora = None
  return merged
