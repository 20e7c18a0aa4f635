"""Running a module on a device mesh by the sharding rules, for sharded == unsharded tests."""

from __future__ import annotations

import jax
from flax import nnx

from flashvl_jax import sharding


def sharded_call(module: nnx.Module, *inputs: jax.Array, mesh_shape=None, **kwargs):
  """`module(*inputs, **kwargs)` jitted on a ('data', 'fsdp', 'tensor') mesh (default 2x2x2).

  Parameters are placed by their logical axes (`sharding.RULES`), inputs are split over the batch.
  Returns (output, sharded parameter state) so tests can check where parameters landed.
  """
  mesh = sharding.make_mesh(mesh_shape or {"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(module)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  forward = jax.jit(lambda s, *xs: nnx.merge(graphdef, s)(*xs, **kwargs))
  with jax.set_mesh(mesh):
    out = forward(state, *[jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in inputs])
  return out, state
