"""The Flash-VL composite against a PyTorch composition of the HF towers and the released adapter.

Both sides load the same tiny random weights: the torch model is written in the released checkpoint layout
(`vit.*`, `adp.*`, `llm.*`) and our model is loaded from that file, so this also covers the released-layout
table. Logits are compared on prompts holding the -200/-201 image placeholders.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flashvl_jax.config import load_config
from flashvl_jax.models.flashvl import FlashVLModel, check_image_placeholders
from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2
from flashvl_jax.testing.tiny_vision import build_tiny_aimv2, build_tiny_siglip, random_pixels
from flashvl_jax.testing.torch_flashvl import build_tiny_flashvl, save_released_layout
from flashvl_jax.weights.flashvl import load_flashvl
from flashvl_jax.testing.mesh import sharded_call

TOL = 1e-4
VOCAB = 160


def placeholder_ids(rng, n_image_tokens, before=5, after=7, batch=2):
  """Rows of random text ids around one image block (-200 then n-1 x -201)."""
  image = [-200] + [-201] * (n_image_tokens - 1)
  rows = [list(rng.integers(0, VOCAB, before)) + image + list(rng.integers(0, VOCAB, after)) for _ in range(batch)]
  return np.asarray(rows, np.int32)


@pytest.fixture(scope="module")
def static_pair(tmp_path_factory):
  """Tiny SigLIP (32px, grid 4 -> 4 image tokens) + tiny Qwen2, in torch and in JAX."""
  root = tmp_path_factory.mktemp("flashvl_static")
  vit = build_tiny_siglip(root / "siglip", seed=1)
  llm = build_tiny_qwen2(root / "qwen2", seed=2)
  ref = build_tiny_flashvl(vit, llm, intermediate=96, seed=3)  # transformers 5: keys are unprefixed
  save_released_layout(ref, root / "flashvl", image_token_num=4)
  return ref, load_flashvl(root / "flashvl"), root / "flashvl"


@pytest.fixture(scope="module")
def aimv2_pair(tmp_path_factory):
  root = tmp_path_factory.mktemp("flashvl_aimv2")
  vit = build_tiny_aimv2(root / "aimv2", seed=4)
  llm = build_tiny_qwen2(root / "qwen2", seed=5, tied=False)
  ref = build_tiny_flashvl(vit, llm, intermediate=80, seed=6)
  save_released_layout(ref, root / "flashvl", image_token_num=8)
  return ref, load_flashvl(root / "flashvl")


def torch_logits(ref, ids, pixels_nhwc=None):
  pixels = None
  if pixels_nhwc is not None:
    pixels = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels_nhwc, -1, -3)))
  with torch.no_grad():
    return ref(torch.from_numpy(ids.astype(np.int64)), pixels).numpy()


def test_static_composite_matches_torch(static_pair):
  ref, ours, _ = static_pair
  ids = placeholder_ids(np.random.default_rng(0), 4)
  pixels = random_pixels(0, 32, 32)
  expected = torch_logits(ref, ids, pixels)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels)))
  assert np.abs(expected).max() > 1.0
  err = np.abs(got - expected).max()
  assert err <= TOL, err
  # the image matters: other pixels change the logits after the image block
  other = np.asarray(ours(jnp.asarray(ids), jnp.asarray(random_pixels(1, 32, 32))))
  assert np.abs(other - got)[:, 5:].max() > 1e-2


def test_text_only_matches_torch(static_pair):
  ref, ours, _ = static_pair
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9)).astype(np.int32)
  err = np.abs(np.asarray(ours(jnp.asarray(ids))) - torch_logits(ref, ids)).max()
  assert err <= TOL, err


def test_multi_tile_aimv2_matches_torch(aimv2_pair):
  """Two AIMv2 tiles per row, each pixel-shuffled on its own (dynamic tiling without thumbnail)."""
  ref, ours = aimv2_pair
  ids = placeholder_ids(np.random.default_rng(2), 8)
  pixels = random_pixels(2, 28, 28, batch=4).reshape(2, 2, 28, 28, 3)
  err = np.abs(np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels))) - torch_logits(ref, ids, pixels)).max()
  assert err <= TOL, err


def test_pre_norm_feature_option(static_pair):
  ref, ours, _ = static_pair
  ids = placeholder_ids(np.random.default_rng(3), 4)
  pixels = random_pixels(3, 32, 32)
  pre = nnx.merge(*nnx.split(ours))
  pre.config = dataclasses.replace(ours.config, vision_feature="pre_norm")
  ref.vision_feature = "pre_norm"
  try:
    expected = torch_logits(ref, ids, pixels)
  finally:
    ref.vision_feature = "post_norm"
  got = np.asarray(pre(jnp.asarray(ids), jnp.asarray(pixels)))
  assert np.abs(got - expected).max() <= TOL
  post = np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels)))
  assert np.abs(post - expected).max() > TOL  # the choice is visible


def test_uint8_pixels_are_normalised_on_device(static_pair):
  """uint8 tiles give the same logits as tiles normalised on the host with the SigLIP statistics."""
  _, ours, _ = static_pair
  ids = placeholder_ids(np.random.default_rng(4), 4)
  raw = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  host = (raw.astype(np.float32) / 255.0 - 0.5) / 0.5
  a = np.asarray(ours(jnp.asarray(ids), jnp.asarray(raw)))
  b = np.asarray(ours(jnp.asarray(ids), jnp.asarray(host)))
  assert np.abs(a - b).max() <= TOL  # x * (1/255) on device vs x / 255 on the host: float rounding only


def test_sharded_forward_equals_unsharded(static_pair):
  _, ours, path = static_pair
  ids = jnp.asarray(placeholder_ids(np.random.default_rng(5), 4, batch=4))
  pixels = jnp.asarray(random_pixels(5, 32, 32, batch=4))
  expected = np.asarray(ours(ids, pixels))
  got, _ = sharded_call(ours, ids, pixels)
  assert len(got.sharding.device_set) == 8
  # fsdp splits the contractions, so sums are reordered: equal to 1e-5 relative (logits are ~1-10)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)


def test_bf16_composite_top1(static_pair):
  """bf16 parameters and compute against the fp32 torch reference: loose bound, >= 99% top-1 agreement."""
  ref, _, path = static_pair
  ours = load_flashvl(path, dtype="bfloat16")
  rng = np.random.default_rng(6)
  ids = placeholder_ids(rng, 4, before=20, after=40, batch=8)
  pixels = random_pixels(6, 32, 32, batch=8)
  expected = torch_logits(ref, ids, pixels)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(pixels)), np.float32)
  err = np.abs(got - expected).max()
  agree = (got.argmax(-1) == expected.argmax(-1)).mean()
  assert err <= 0.05 * np.abs(expected).max(), err
  assert agree >= 0.99, agree


def test_placeholder_check():
  ids = np.array([[1, -200, -201, 2], [1, -200, 2, 3]])
  check_image_placeholders(ids[:1], 2)
  with pytest.raises(ValueError, match="row 1: 1 placeholders vs 2"):
    check_image_placeholders(ids, 2)


@pytest.mark.parametrize("preset, vit_params", [("flashvl-2b-static", 413_534_448),
                                                ("flashvl-2b-dynamic-iss", 682_031_616)])
def test_full_size_parameter_counts(preset, vit_params):
  cfg = load_config(preset)
  model = nnx.eval_shape(lambda: FlashVLModel(cfg, rngs=nnx.Rngs(0)))
  count = lambda m: sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
  assert count(model.vit) == vit_params
  assert count(model.llm) == 1_543_714_304
  a = cfg.adapter
  c4 = 4 * cfg.vision.hidden_size
  assert count(model.adp) == 2 * c4 + (c4 + 1) * a.intermediate_size + (a.intermediate_size + 1) * (
      a.intermediate_size + cfg.llm.hidden_size)


def test_from_hf_dispatch_and_errors(static_pair, tmp_path):
  from flashvl_jax.weights.auto import from_hf
  from flashvl_jax.weights.hf_io import CheckpointError

  assert isinstance(from_hf(static_pair[2]), FlashVLModel)
  with pytest.raises(CheckpointError, match="does not exist"):
    from_hf(tmp_path / "absent")
  (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
  with pytest.raises(CheckpointError, match="unknown architecture.*llama"):
    from_hf(tmp_path)
