"""Device mesh and the one rules table that maps logical axis roles to mesh axes.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); activations are
constrained at block boundaries with `constrain(x, ("batch", "length", "act_embed"))`. Both resolve
through `RULES`. A mesh axis is dropped for a dimension it does not divide (e.g. 2 KV heads on a
4-way tensor axis), so tiny test models and odd vocab sizes shard without special cases.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flashvl_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical role -> mesh axes (tuple: shard over several; None: replicate)
RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "layers": None,  # the leading axis of stacked per-layer parameters
    "embed": ("fsdp",),  # model width of a weight matrix
    "vocab": ("tensor",),
    "heads": ("tensor",),  # q / o projections: heads * head_dim
    "kv_heads": ("tensor",),  # k / v projections: kv_heads * head_dim
    "mlp": ("tensor",),
    "norm": None,
    "patch": None,  # flattened patch pixels / conv window
    "positions": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def _describe(sizes: Sequence[int]) -> str:
  return ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh. Sizes may be -1 (fill with the remaining devices).

  `shape=None` puts every device on 'fsdp'.
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    sizes = [1, -1, 1]
  elif isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ConfigError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ConfigError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise ConfigError(f"mesh {_describe(sizes)}: every axis size must be >= 1, except at most one -1 (all remaining "
                      "devices)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"mesh {_describe(sizes)} cannot be filled by {len(devices)} devices: the fixed axes "
                        f"multiply to {known}, which does not divide {len(devices)}; set mesh.data, mesh.fsdp and "
                        "mesh.tensor (one may be -1) so that they fit")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {_describe(sizes)} needs {math.prod(sizes)} devices, {len(devices)} are available; "
                      "set mesh.data, mesh.fsdp and mesh.tensor (one may be -1) so that they fit")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Any) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims have logical `names`, on `mesh`."""
  if names is None:
    return PartitionSpec()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} has no entry in sharding.RULES")
    kept = []
    for axis in axes or ():
      size = mesh.shape.get(axis, 1)
      if axis in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in kept)):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the ambient mesh (`jax.set_mesh`); else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def _variable_spec(var: nnx.Variable, mesh: Mesh) -> PartitionSpec:
  names = var.get_metadata().get("out_sharding")
  return logical_to_spec(names, var.shape, mesh) if names else PartitionSpec()


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every variable of an (abstract) nnx state, by its logical axis names."""
  return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, _variable_spec(v, mesh))) if isinstance(
      v, nnx.Variable) else NamedSharding(mesh, PartitionSpec()),
                      state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Inputs whose leading dim is the batch: split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def create_sharded(make_module, mesh: Mesh | None):
  """Builds the module returned by `make_module()` directly into the shardings `RULES` give on `mesh`.

  Parameters are created inside one jit with `out_shardings`, so no device ever holds the whole model
  unless the rules replicate it. With `mesh=None` this is just `make_module()`.
  """
  if mesh is None:
    return make_module()
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
  shardings = state_shardings(abstract_state, mesh)

  def init():
    return nnx.state(make_module())

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def describe(state: Any) -> str:
  """One line per variable: path, shape, dtype and sharding spec (for logs and debugging)."""
  rows = []
  for path, v in nnx.to_flat_state(state):
    arr = v.get_value() if isinstance(v, nnx.Variable) else v
    spec = getattr(getattr(arr, "sharding", None), "spec", None)
    rows.append(f"{'.'.join(map(str, path))}: {tuple(arr.shape)} {np.dtype(arr.dtype).name} {spec}")
  return "\n".join(rows)


def without_axes(spec: PartitionSpec, axes: set[str] | Sequence[str]) -> PartitionSpec:
  """`spec` no longer split over `axes` (replicated over them)."""
  entries = []
  for entry in spec:
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
    entries.append(kept if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*entries)


def process_mesh(mesh: Mesh) -> Mesh:
  """The block of `mesh` that this process's devices form, with the same axes (an axis split across processes
  shrinks to this process's part). On one process it is `mesh`. Raises `ValueError` when the process's devices
  are not one block (a mesh built by `make_mesh` from `jax.devices()` always gives blocks)."""
  me = jax.process_index()
  mine = np.vectorize(lambda d: d.process_index == me, otypes=[bool])(mesh.devices)
  rows = [np.flatnonzero(mine.any(axis=tuple(a for a in range(mine.ndim) if a != i))) for i in range(mine.ndim)]
  block = np.ix_(*rows)
  if not mine[block].all() or mine[block].size != mine.sum():
    raise ValueError(f"process {me}'s devices do not form one block of the mesh {dict(mesh.shape)}")
  return Mesh(mesh.devices[block], mesh.axis_names, axis_types=mesh.axis_types)


@functools.partial(jax.jit, static_argnums=1)
def _reshard(arrays: list[jax.Array], shardings: tuple[NamedSharding, ...]) -> list[jax.Array]:
  """`arrays` laid out by `shardings`; compiled once per set of shapes and shardings (GRPO calls it every step)."""
  return [jax.lax.with_sharding_constraint(x, s) for x, s in zip(arrays, shardings)]


def to_process_mesh(tree: Any, local: Mesh, replicate: Sequence[str] = ()) -> Any:
  """`tree`'s global arrays (NamedSharding on a mesh that `local = process_mesh(mesh)` is a block of) as arrays on
  `local`, to run this process's own computations on them, no longer split over the `replicate` axes.

  Dimensions split over those axes or over an axis split across processes are gathered first (a collective:
  every process calls this at the same point); arrays that need no gathering keep their buffers (no copy).
  """

  leaves, treedef = jax.tree.flatten(tree)
  split = lambda mesh: {a for a in mesh.axis_names if local.shape[a] < mesh.shape[a]}
  gathered = [NamedSharding(x.sharding.mesh, without_axes(x.sharding.spec, set(replicate) | split(x.sharding.mesh)))
              for x in leaves]
  moved = [i for i, (g, x) in enumerate(zip(gathered, leaves)) if g.spec != x.sharding.spec]
  if moved:
    copies = _reshard([leaves[i] for i in moved], tuple(gathered[i] for i in moved))
    for i, copy in zip(moved, copies):
      leaves[i] = copy
  local_leaves = [jax.make_array_from_single_device_arrays(x.shape, NamedSharding(local, g.spec),
                                                           [s.data for s in x.addressable_shards])
                  for x, g in zip(leaves, gathered)]
  return jax.tree.unflatten(treedef, local_leaves)
