"""Adapter parity: our gather-based pixel shuffle + MLP against InternVL's pixel_shuffle + the torch adapter."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flashvl_jax.config import AdapterConfig
from flashvl_jax.models.adapter import Adapter, gather_patches
from flashvl_jax.preprocess.tiling import pixel_shuffle_index
from flashvl_jax.testing.randomize import randomize_
from flashvl_jax.testing.torch_flashvl import TorchAdapter, internvl_pixel_shuffle
from flashvl_jax.weights import adapter as adapter_weights
from flashvl_jax.weights.hf_io import param_shapes
from flashvl_jax.weights.mapping import run_import

C, D_LLM, INTER = 16, 24, 40
TOL = 1e-4


def make_pair(kind: str, order: str):
  cfg = AdapterConfig(kind=kind, intermediate_size=INTER, token_order=order)
  ours = Adapter(cfg, C, D_LLM, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref = TorchAdapter(C, INTER, D_LLM, kind=kind).eval()
  randomize_(ref, seed=1)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  steps = adapter_weights.table(cfg).plan_import({k: v.shape for k, v in sd.items()}, param_shapes(ours))
  flat = dict(run_import(steps, sd.__getitem__))
  for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
    var.set_value(jnp.asarray(flat[".".join(map(str, path))]))
  return ours, ref


def run(ours, ref, order, grid, seed=0, ref_order=None):
  ref_order = ref_order or order
  h, w = grid
  feats = torch.randn(2, h * w, C, generator=torch.Generator().manual_seed(seed)) * 3
  with torch.no_grad():
    shuffled = internvl_pixel_shuffle(feats.reshape(2, h, w, C), ps_version="v2" if ref_order == "row_major" else "v1")
    expected = ref(shuffled.reshape(2, -1, 4 * C)).numpy()
  x = gather_patches(jnp.asarray(feats.numpy()), jnp.asarray(pixel_shuffle_index(h, w, 2, order)))
  return np.asarray(ours(x)), expected


@pytest.mark.parametrize("kind", ["ln_mlp3", "mlp2"])
@pytest.mark.parametrize("order", ["row_major", "column_major"])
@pytest.mark.parametrize("grid", [(4, 4), (4, 6)])
def test_adapter_matches_torch(kind, order, grid):
  ours, ref = make_pair(kind, order)
  got, expected = run(ours, ref, order, grid)
  assert np.abs(expected).max() > 0.5  # outputs are O(1): the tolerance is meaningful
  err = np.abs(got - expected).max()
  assert err <= TOL, f"max abs diff {err:.2e}"


def test_adapter_negative_checks():
  """A tanh GELU in the reference, a wrong LayerNorm eps, or the other token order break the tolerance."""
  ours, ref = make_pair("ln_mlp3", "row_major")
  ref.p0[2].approximate = ref.p0[4].approximate = "tanh"
  got, expected = run(ours, ref, "row_major", (4, 4))
  assert np.abs(got - expected).max() > TOL

  ours, ref = make_pair("ln_mlp3", "row_major")
  ref.p0[0].eps = 1e-2  # a grossly wrong eps; 1e-6 vs 1e-5 is below fp32 noise at unit variance
  got, expected = run(ours, ref, "row_major", (4, 4))
  assert np.abs(got - expected).max() > TOL

  ours, ref = make_pair("ln_mlp3", "row_major")
  got, expected = run(ours, ref, "row_major", (4, 4), ref_order="column_major")  # InternVL v1 vs our v2 order
  assert np.abs(got - expected).max() > TOL
