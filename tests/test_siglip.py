"""SigLIP vision tower vs the transformers `SiglipVisionModel` on tiny random checkpoints (fp32 unless stated).

Tolerance 1e-4 max abs on outputs of magnitude ~4; the negative controls show plausible mistakes exceed it.
"""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from flashvl_jax.config import ConfigError, load_config
from flashvl_jax.models import siglip
from flashvl_jax.models.siglip import SiglipVisionTower, bicubic_matrix
from flashvl_jax.testing import tiny_vision
from flashvl_jax.weights import siglip as siglip_weights
from flashvl_jax.weights.hf_io import SafetensorsReader, WeightMappingError, param_shapes
from flashvl_jax.testing.mesh import sharded_call

TOL = 1e-4


max_diff = tiny_vision.max_abs_diff


def pixels(seed, h=32, w=32, batch=2):
  return tiny_vision.random_pixels(seed, h, w, batch)


# Jitted: op-by-op (eager) dispatch compiles every op separately, several times slower on these tiny models.
@nnx.jit(static_argnames="interpolate")
def features(tower, x, interpolate=False):
  return tower.forward_features(x, interpolate)


@nnx.jit
def pooled(tower, x):
  return tower.pool(tower(x))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("siglip")
  return tiny_vision.build_tiny_siglip(path), path


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
  path = tmp_path_factory.mktemp("siglip_head")
  return tiny_vision.build_tiny_siglip(path, seed=1, use_head=True), path


def test_last_hidden_state_and_pre_norm_match_hf(tiny):
  model, path = tiny
  tower = siglip_weights.load_siglip(path)
  x = pixels(0)
  ref = tiny_vision.reference_outputs(model, x)
  pre, post = features(tower, jnp.asarray(x))
  assert post.shape == (2, 16, 64)
  assert np.abs(ref["post_norm"]).max() > 1.0  # the comparison is on O(1) values
  d_post, d_pre = max_diff(post, ref["post_norm"]), max_diff(pre, ref["pre_norm"])
  print(f"siglip last_hidden_state {d_post:.2e}, hidden_states[-1] {d_pre:.2e}")
  assert d_post <= TOL and d_pre <= TOL


@pytest.mark.parametrize("height,width", [(48, 40), (24, 16), (32, 48)])
def test_interpolate_pos_encoding_matches_hf_bicubic(tiny, height, width):
  model, path = tiny
  tower = siglip_weights.load_siglip(path)
  x = pixels(1, height, width)
  ref = tiny_vision.reference_outputs(model, x, interpolate_pos_encoding=True)
  out = features(tower, jnp.asarray(x), interpolate=True)[1]
  assert out.shape == (2, (height // 8) * (width // 8), 64)
  d = max_diff(out, ref["post_norm"])
  print(f"siglip bicubic positions {height}x{width}: {d:.2e}")
  assert d <= TOL


def test_bicubic_matrix_matches_torch_interpolate():
  import torch

  grid = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
  for out_h, out_w in ((6, 5), (3, 2), (4, 4), (9, 1)):
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(out_h, out_w), mode="bicubic",
                                          align_corners=False)[0, 0].numpy()
    ours = bicubic_matrix(4, out_h) @ grid[0, 0] @ bicubic_matrix(4, out_w).T
    assert max_diff(ours, ref) <= 1e-6, (out_h, out_w)


def test_map_head_pooler_matches_hf(tiny_head):
  model, path = tiny_head
  tower = siglip_weights.load_siglip(path)
  assert tower.cfg.use_head
  x = pixels(2)
  ref = tiny_vision.reference_outputs(model, x)
  pool = pooled(tower, jnp.asarray(x))
  assert pool.shape == (2, 64)
  d = max_diff(pool, ref["pooler"])
  print(f"siglip MAP head pooler_output {d:.2e}")
  assert d <= TOL
  without = siglip_weights.load_siglip(path, use_head=False)  # Flash-VL skips the head: its keys are dropped
  assert not any(k.startswith("head.") for k in param_shapes(without))
  with pytest.raises(ValueError, match="without its MAP head"):
    without.pool(jnp.zeros((2, 16, 64)))


def test_full_siglip_model_checkpoint_loads_the_vision_tower(tmp_path):
  model = tiny_vision.build_tiny_siglip(tmp_path, seed=3, use_head=True, full_model=True)
  keys = SafetensorsReader(tmp_path).keys()
  assert any(k.startswith("text_model.") for k in keys) and "logit_scale" in keys
  tower = siglip_weights.load_siglip(tmp_path)
  x = pixels(3)
  ref = tiny_vision.reference_outputs(model, x)
  d, d_pool = max_diff(features(tower, jnp.asarray(x))[1], ref["post_norm"]), max_diff(pooled(tower, x), ref["pooler"])
  print(f"SiglipModel checkpoint: last_hidden_state {d:.2e}, pooler {d_pool:.2e}")
  assert d <= TOL and d_pool <= TOL


def test_exact_erf_gelu_breaks_the_tolerance(tiny, monkeypatch):
  model, path = tiny
  tower = siglip_weights.load_siglip(path)
  x = pixels(0)
  ref = tiny_vision.reference_outputs(model, x)["post_norm"]
  monkeypatch.setattr(siglip, "gelu_tanh", lambda h: jax.nn.gelu(h, approximate=False))
  d = max_diff(nnx.jit(lambda m, x: m(x))(tower, jnp.asarray(x)), ref)  # a fresh trace sees the patch
  print(f"siglip with exact-erf GELU: {d:.2e}")
  assert d > TOL


def test_wrong_layernorm_eps_breaks_the_tolerance(tmp_path):
  # With the default randomisation hidden states have variance ~0.3 and eps 1e-5 vs 1e-6 moves the output by
  # only ~2e-5. Scaling the embeddings by 0.1 gives low-variance tokens, where eps matters.
  model = tiny_vision.build_tiny_siglip(tmp_path, seed=4, embed_scale=0.1)
  x = pixels(4)
  ref = tiny_vision.reference_outputs(model, x)["post_norm"]
  tower = siglip_weights.load_siglip(tmp_path)
  assert tower.cfg.norm_eps == 1e-6
  d_right = max_diff(features(tower, jnp.asarray(x))[1], ref)
  with nnx.use_eager_sharding(False):
    wrong = nnx.eval_shape(lambda: SiglipVisionTower(dataclasses.replace(tower.cfg, norm_eps=1e-5), rngs=nnx.Rngs(0)))
  nnx.update(wrong, nnx.state(tower, nnx.Param))
  d_wrong = max_diff(features(wrong, jnp.asarray(x))[1], ref)
  print(f"siglip low-variance model: eps 1e-6 {d_right:.2e}, eps 1e-5 {d_wrong:.2e}")
  assert d_right <= TOL < d_wrong


def test_bfloat16_tower_is_close_to_fp32_reference(tiny):
  model, path = tiny
  tower = siglip_weights.load_siglip(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert tower.embeddings.patch_embedding.kernel.dtype == jnp.bfloat16
  x = pixels(5)
  ref = tiny_vision.reference_outputs(model, x)["post_norm"]
  out = features(tower, jnp.asarray(x))[1]
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  rel = max_diff(out, ref) / np.abs(ref).max()
  cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
  print(f"siglip bf16: max abs {max_diff(out, ref):.3e}, relative {rel:.3e}, min token cosine {cos.min():.5f}")
  # bf16 keeps 8 mantissa bits (rel. rounding 2^-9 = 2e-3 per op); through 2 blocks a few % of the max is the
  # expected worst case, while a real bug (wrong order, missing term) gives O(1) relative errors.
  assert rel < 5e-2 and cos.min() > 0.999


def test_checkpoint_key_errors_list_every_offending_key(tiny, tmp_path):
  _, path = tiny
  reader = SafetensorsReader(path)
  tensors = {k: reader.get(k) for k in reader.keys()}
  del tensors["encoder.layers.0.mlp.fc1.bias"]
  tensors["encoder.layers.0.mlp.fc3.weight"] = np.zeros((4, 4), np.float32)
  tensors["post_layernorm.weight"] = tensors["post_layernorm.weight"][:-1]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(path / "config.json", tmp_path / "config.json")
  with pytest.raises(WeightMappingError) as err:
    siglip_weights.load_siglip(tmp_path)
  msg = str(err.value)
  for needle in ("encoder.layers.0.mlp.fc1.bias", "encoder.layers.0.mlp.fc3.weight", "post_layernorm.weight (63,)",
                 "missing parameters", "unexpected keys", "shape mismatches"):
    assert needle in msg, msg


def test_export_reproduces_hf_tensors_and_config(tiny_head, tmp_path):
  model, path = tiny_head
  tower = siglip_weights.load_siglip(path)
  exported = tiny_vision.export_tensors(tower, siglip_weights.table(tower.cfg))
  reader = SafetensorsReader(path)
  assert sorted(exported) == reader.keys()
  for key in reader.keys():
    original = reader.get(key)
    assert exported[key].dtype == original.dtype and np.array_equal(exported[key], original), key
  # The exported directory loads in transformers and computes the same function.
  from transformers import SiglipVisionModel

  save_file(exported, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(siglip_weights.hf_config_from(tower.cfg)))
  reloaded = SiglipVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
  x = pixels(6)
  a, b = tiny_vision.reference_outputs(reloaded, x), tiny_vision.reference_outputs(model, x)
  assert max_diff(a["post_norm"], b["post_norm"]) == 0 and max_diff(a["pooler"], b["pooler"]) == 0


def test_config_from_hf_reads_4x_diff_only_and_nested_configs():
  # transformers 4.x writes only non-default fields; SiglipModel nests the vision part.
  so400m = {"model_type": "siglip", "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                                                       "num_hidden_layers": 27, "num_attention_heads": 16,
                                                       "image_size": 512, "patch_size": 16}}
  cfg = siglip_weights.config_from_hf(so400m)
  assert cfg == dataclasses.replace(load_config("flashvl-2b-static").vision, use_head=True)
  roundtrip = siglip_weights.config_from_hf(siglip_weights.hf_config_from(cfg))
  assert roundtrip == cfg
  with pytest.raises(ConfigError, match="NaFlex"):
    siglip_weights.config_from_hf({"model_type": "siglip2", "vision_config": {}})
  with pytest.raises(ConfigError, match="hidden_act"):
    siglip_weights.config_from_hf({"model_type": "siglip_vision_model", "hidden_act": "gelu"})


def test_wrong_pixel_shapes_raise(tiny):
  _, path = tiny
  tower = siglip_weights.load_siglip(path)
  with pytest.raises(ValueError, match="32x32"):
    tower(jnp.zeros((1, 48, 32, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    tower(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="multiples of the patch size 8"):
    tower(jnp.zeros((1, 36, 32, 3)), interpolate_pos_encoding=True)


def test_sharded_forward_matches_unsharded(tiny):
  model, path = tiny
  tower = siglip_weights.load_siglip(path)
  x = pixels(7, batch=4)
  expected = np.asarray(features(tower, jnp.asarray(x))[1])
  out, state = sharded_call(tower, jnp.asarray(x))
  q_kernel = state["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"][...]  # stacked [L, in, out]
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  d = max_diff(out, expected)
  print(f"siglip sharded (2x2x2 mesh) vs unsharded: {d:.2e}")
  assert d <= 1e-5


@pytest.mark.slow
def test_full_size_parameter_count():
  cfg = dataclasses.replace(load_config("flashvl-2b-static").vision, use_head=True)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: SiglipVisionTower(cfg, rngs=nnx.Rngs(0)))
  shapes = param_shapes(abstract)
  without_head = {k: v for k, v in shapes.items() if not k.startswith("head.")}
  assert sum(math.prod(s) for s in shapes.values()) == 428_772_800
  assert sum(math.prod(s) for s in without_head.values()) == 413_534_448
  # The tables cover every parameter (export plans from shapes alone): 16 keys a layer, 5 outside, 11 in the head.
  assert len(siglip_weights.table(cfg).plan_export(shapes)) == 16 * 27 + 5 + 11
  no_head_cfg = dataclasses.replace(cfg, use_head=False)
  assert len(siglip_weights.table(no_head_cfg).plan_export(without_head)) == 16 * 27 + 5
