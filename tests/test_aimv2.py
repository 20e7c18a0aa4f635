"""AIMv2 vision tower vs the transformers `Aimv2VisionModel` on tiny random checkpoints, and Apple's original
key layout (fp32 unless stated). Tolerance 1e-4 max abs on outputs of magnitude ~4."""

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
from flashvl_jax.models.aimv2 import Aimv2Embeddings, Aimv2VisionTower
from flashvl_jax.models.siglip import patchify
from flashvl_jax.testing import tiny_vision
from flashvl_jax.weights import aimv2 as aimv2_weights
from flashvl_jax.weights.hf_io import SafetensorsReader, WeightMappingError, param_arrays, param_shapes
from flashvl_jax.testing.mesh import sharded_call

TOL = 1e-4
max_diff = tiny_vision.max_abs_diff


def pixels(seed, batch=2):
  return tiny_vision.random_pixels(seed, 28, 28, batch)


# Jitted: op-by-op (eager) dispatch compiles every op separately, several times slower on these tiny models.
@nnx.jit
def features(tower, x):
  return tower.forward_features(x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch model, transformers-layout dir, Apple-layout dir) holding the same weights."""
  path = tmp_path_factory.mktemp("aimv2")
  model = tiny_vision.build_tiny_aimv2(path)
  apple = tmp_path_factory.mktemp("aimv2_apple")
  tiny_vision.write_apple_layout(model, apple)
  return model, path, apple


def test_last_hidden_state_and_pre_norm_match_hf(tiny):
  model, path, _ = tiny
  tower = aimv2_weights.load_aimv2(path)
  x = pixels(0)
  ref = tiny_vision.reference_outputs(model, x)
  pre, post = features(tower, jnp.asarray(x))
  assert post.shape == (2, 16, 64)
  assert np.abs(ref["post_norm"]).max() > 1.0
  d_post, d_pre = max_diff(post, ref["post_norm"]), max_diff(pre, ref["pre_norm"])
  print(f"aimv2 last_hidden_state {d_post:.2e}, hidden_states[-1] {d_pre:.2e}")
  assert d_post <= TOL and d_pre <= TOL


def test_apple_layout_gives_identical_parameters_and_outputs(tiny):
  _, path, apple = tiny
  ours, theirs = aimv2_weights.load_aimv2(path), aimv2_weights.load_aimv2(apple)
  assert aimv2_weights.checkpoint_table(theirs.cfg, SafetensorsReader(apple).keys()).name == "aimv2-apple"
  assert ours.cfg == theirs.cfg
  a, b = param_arrays(ours), param_arrays(theirs)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  x = jnp.asarray(pixels(1))
  np.testing.assert_array_equal(np.asarray(features(ours, x)[1]), np.asarray(features(theirs, x)[1]))


@pytest.mark.parametrize("layout", ["transformers", "apple"])
def test_export_reproduces_every_tensor_bit_exactly(tiny, layout):
  _, path, apple = tiny
  source = path if layout == "transformers" else apple
  tower = aimv2_weights.load_aimv2(source)
  tbl = aimv2_weights.table(tower.cfg) if layout == "transformers" else aimv2_weights.apple_table(tower.cfg)
  exported = tiny_vision.export_tensors(tower, tbl)
  reader = SafetensorsReader(source)
  assert sorted(exported) == reader.keys()
  for key in reader.keys():
    original = reader.get(key)
    assert exported[key].dtype == original.dtype and np.array_equal(exported[key], original), key


def test_exported_transformers_checkpoint_loads_in_transformers(tiny, tmp_path):
  model, _, apple = tiny
  from transformers import Aimv2VisionModel

  tower = aimv2_weights.load_aimv2(apple)  # Apple layout in, transformers layout out
  save_file(tiny_vision.export_tensors(tower, aimv2_weights.table(tower.cfg)), str(tmp_path / "model.safetensors"),
            metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(aimv2_weights.hf_config_from(tower.cfg)))
  reloaded = Aimv2VisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
  x = pixels(2)
  assert max_diff(tiny_vision.reference_outputs(reloaded, x)["post_norm"],
                  tiny_vision.reference_outputs(model, x)["post_norm"]) == 0


def test_rms_norm_after_position_add_breaks_the_tolerance(tiny, monkeypatch):
  model, path, _ = tiny
  tower = aimv2_weights.load_aimv2(path)
  x = pixels(3)
  ref = tiny_vision.reference_outputs(model, x)["post_norm"]

  def norm_after_positions(self, px):
    return self.rms_norm(patchify(self.patch_embed, px) + self.position_embedding[...])

  monkeypatch.setattr(Aimv2Embeddings, "__call__", norm_after_positions)
  d = max_diff(nnx.jit(lambda m, x: m(x))(tower, jnp.asarray(x)), ref)  # a fresh trace sees the patch
  print(f"aimv2 with RMSNorm after the position add: {d:.2e}")
  assert d > TOL


def test_bfloat16_tower_is_close_to_fp32_reference(tiny):
  model, path, _ = tiny
  tower = aimv2_weights.load_aimv2(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert tower.encoder.layers.attention.q_proj.kernel.dtype == jnp.bfloat16
  x = pixels(4)
  ref = tiny_vision.reference_outputs(model, x)["post_norm"]
  out = features(tower, jnp.asarray(x))[1]
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  rel = max_diff(out, ref) / np.abs(ref).max()
  cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
  print(f"aimv2 bf16: max abs {max_diff(out, ref):.3e}, relative {rel:.3e}, min token cosine {cos.min():.5f}")
  # bf16 rounding is 2^-9 relative per op; a few % of the max through 2 blocks is the expected worst case.
  assert rel < 5e-2 and cos.min() > 0.999


def test_checkpoint_key_errors_list_every_offending_key(tiny, tmp_path):
  _, _, apple = tiny
  reader = SafetensorsReader(apple)
  tensors = {k: reader.get(k) for k in reader.keys()}
  del tensors["trunk.blocks.1.mlp.fc3.weight"]
  tensors["trunk.blocks.0.attn.qkv.bias"] = np.zeros((192,), np.float32)  # a qkv_bias checkpoint
  tensors["trunk.blocks.0.attn.qkv.weight"] = tensors["trunk.blocks.0.attn.qkv.weight"][:, :-1]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(apple / "config.json", tmp_path / "config.json")
  with pytest.raises(WeightMappingError) as err:
    aimv2_weights.load_aimv2(tmp_path)
  msg = str(err.value)
  for needle in ("encoder.layers.1.ffn.up_proj.kernel (layer 1 of encoder.layers.ffn.up_proj.kernel)", "trunk.blocks.0.attn.qkv.bias",
                 "trunk.blocks.0.attn.qkv.weight (192, 63)", "missing parameters", "unexpected keys",
                 "shape mismatches"):
    assert needle in msg, msg


def test_config_from_hf_reads_apple_and_transformers_configs(tiny):
  _, path, apple = tiny
  from_hf = aimv2_weights.config_from_hf(json.loads((path / "config.json").read_text()))
  from_apple = aimv2_weights.config_from_hf(json.loads((apple / "config.json").read_text()))
  assert from_hf == from_apple
  assert (from_hf.hidden_size, from_hf.image_size, from_hf.patch_size, from_hf.norm_eps) == (64, 28, 7, 1e-5)
  for layout in ("transformers", "apple"):
    assert aimv2_weights.config_from_hf(aimv2_weights.hf_config_from(from_hf, layout)) == from_hf
  # Apple's aimv2-huge-patch14-448 config, as 4.x writes it (defaults omitted).
  huge = {"model_type": "aimv2", "hidden_size": 1536, "intermediate_size": 4096, "num_attention_heads": 12,
          "image_size": 448, "torch_dtype": "float32"}
  assert aimv2_weights.config_from_hf(huge) == load_config("flashvl-2b-dynamic").vision
  for bad, needle in ((dict(qkv_bias=True), "qkv_bias=True"), (dict(use_bias=True), "use_bias=True"),
                      (dict(is_native=True), "is_native=True"), (dict(hidden_act="gelu"), "hidden_act")):
    with pytest.raises(ConfigError, match=needle):
      aimv2_weights.config_from_hf({**huge, **bad})


def test_wrong_pixel_shapes_raise(tiny):
  _, path, _ = tiny
  tower = aimv2_weights.load_aimv2(path)
  with pytest.raises(ValueError, match="28x28"):
    tower(jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    tower(jnp.zeros((1, 3, 28, 28)))


def test_sharded_forward_matches_unsharded(tiny):
  _, path, _ = tiny
  tower = aimv2_weights.load_aimv2(path)
  x = pixels(5, batch=4)
  expected = np.asarray(features(tower, jnp.asarray(x))[1])
  out, state = sharded_call(tower, jnp.asarray(x))
  up_kernel = state["encoder"]["layers"]["ffn"]["up_proj"]["kernel"][...]  # stacked [L, in, out]
  assert up_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  d = max_diff(out, expected)
  print(f"aimv2 sharded (2x2x2 mesh) vs unsharded: {d:.2e}")
  assert d <= 1e-5


@pytest.mark.slow
def test_full_size_parameter_count():
  cfg = load_config("flashvl-2b-dynamic").vision
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Aimv2VisionTower(cfg, rngs=nnx.Rngs(0)))
  shapes = param_shapes(abstract)
  assert sum(math.prod(s) for s in shapes.values()) == 682_031_616
  # Both tables cover every parameter: 9 HF keys a layer (7 with Apple's fused qkv), 5 outside.
  assert len(aimv2_weights.table(cfg).plan_export(shapes)) == 9 * 24 + 5
  assert len(aimv2_weights.apple_table(cfg).plan_export(shapes)) == 7 * 24 + 5
