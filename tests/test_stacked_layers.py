"""Stacked, scanned layers: one traced layer whatever the depth, strict weight mapping for stacked leaves, decode
reading the stacked weights in place, the old per-layer checkpoint format refused with advice."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from flashvl_jax import checkpoint, sampling
from flashvl_jax.compile_bench import hlo_shape, stacked_weight_copies
from flashvl_jax.config import LLMConfig, load_config
from flashvl_jax.engine import Engine
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.models.layers import rope_cos_sin
from flashvl_jax.models.qwen2 import Qwen2ForCausalLM
from flashvl_jax.train.optimizer import is_matrix
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights.hf_io import param_shapes
from flashvl_jax.weights.mapping import WeightMappingError, run_import

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, tie_word_embeddings=True)


def qwen(layers: int) -> Qwen2ForCausalLM:
  return Qwen2ForCausalLM(LLMConfig(num_hidden_layers=layers, **SMALL), rngs=nnx.Rngs(0))


def hf_shape(step, ours) -> tuple[int, ...]:
  """The HF tensor shape an export step writes (one layer of a stacked leaf; torch kernels are [out, in])."""
  shape = ours[step.our_paths[0]][1:] if step.index is not None else ours[step.our_paths[0]]
  return shape[::-1] if step.our_paths[0].endswith("kernel") else shape


def test_parameters_are_stacked_and_one_layer_is_traced():
  model = qwen(3)
  shapes = param_shapes(model)
  assert shapes["model.layers.mlp.up_proj.kernel"] == (3, 64, 128)
  assert shapes["model.layers.input_layernorm.scale"] == (3, 64)
  assert shapes["model.embed_tokens.embedding"] == (256, 64)  # not stacked
  ids = jnp.zeros((1, 8), jnp.int32)
  sizes = {}
  for layers in (2, 6):
    jaxpr = jax.make_jaxpr(lambda m, x: m(x))(qwen(layers), ids)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == layers
    sizes[layers] = len(str(jaxpr))
  assert abs(sizes[6] - sizes[2]) < 200  # the program does not grow with depth (only a few shape digits differ)


def test_layer_slices_are_the_layers():
  """Running the stack equals applying each layer's slice by hand in order (the scan keeps the layer order)."""
  model = qwen(3)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 7)), jnp.int32)
  h = model.embed(ids)
  cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(7), (2, 7)), 16, model.config.rope_theta, h.dtype)
  mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
  graphdef, state = nnx.split(model.model.layers)
  for i in range(3):
    layer = nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))
    h = layer(h, cos=cos, sin=sin, mask=mask)
  expected = model.logits_from_hidden(model.model.norm(h))
  np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(expected), atol=1e-5)


def test_mapping_names_missing_extra_and_misshapen_layers():
  table = qwen2_weights.table(LLMConfig(num_hidden_layers=2, **SMALL))
  ours = param_shapes(nnx.eval_shape(lambda: qwen(2)))
  hf = {s.hf_key: hf_shape(s, ours) for s in table.plan_export(ours)}
  assert len(table.plan_import(hf, ours)) == len(hf)  # the exported key set imports back exactly
  bad = dict(hf)
  del bad["model.layers.1.mlp.up_proj.weight"]
  bad["model.layers.2.mlp.up_proj.weight"] = hf["model.layers.0.mlp.up_proj.weight"]  # a third layer
  bad["model.layers.0.mlp.down_proj.weight"] = (64, 127)
  with pytest.raises(WeightMappingError) as e:
    table.plan_import(bad, ours)
  msg = str(e.value)
  for needle in ("model.layers.1.mlp.up_proj.kernel (layer 1 of model.layers.mlp.up_proj.kernel)",
                 "model.layers.2.mlp.up_proj.weight (layer 2, but the model's model.layers.mlp.up_proj.kernel holds "
                 "2 layers)", "model.layers.0.mlp.down_proj.weight (64, 127)"):
    assert needle in msg, msg


def test_import_assembles_stacked_leaves_one_group_at_a_time_in_the_target_dtype():
  table = qwen2_weights.table(LLMConfig(num_hidden_layers=2, **SMALL))
  model = nnx.eval_shape(lambda: qwen(2))
  ours = param_shapes(model)
  rng = np.random.default_rng(1)
  tensors = {}
  for s in table.plan_export(ours):
    tensors[s.hf_key] = rng.standard_normal(hf_shape(s, ours)).astype(ml_dtypes.bfloat16)
  steps = table.plan_import({k: v.shape for k, v in tensors.items()}, ours)
  reads = []
  out = dict(run_import(steps, lambda k: reads.append(k) or tensors[k], {p: np.float32 for p in ours}))
  assert set(out) == set(ours) and sorted(reads) == sorted(tensors)  # every tensor read once
  up = out["model.layers.mlp.up_proj.kernel"]
  assert up.dtype == np.float32 and up.shape == (2, 64, 128)
  np.testing.assert_array_equal(up[1], tensors["model.layers.1.mlp.up_proj.weight"].astype(np.float32).T)
  # a stacked leaf's layers are read back to back, so only one leaf is being assembled at a time
  up_reads = [i for i, k in enumerate(reads) if ".mlp.up_proj." in k]
  assert up_reads == list(range(up_reads[0], up_reads[0] + 2))


@pytest.mark.parametrize("attention", ["xla", "looped"])
def test_decode_reads_the_stacked_weights_in_place(attention):
  """The compiled decode loop never materialises a whole stacked weight (only parameters and tuple plumbing carry
  those shapes), and its temporaries are smaller than the stacked weights themselves."""
  cfg = load_config("tiny-static", ["llm.num_hidden_layers=4", "llm.hidden_size=128", "llm.intermediate_size=512",
                                    "llm.vocab_size=512"])
  model = FlashVLModel(cfg, rngs=nnx.Rngs(0))
  sampler = sampling.Sampler(model)
  params = sampling.SamplingParams()
  carry = sampler.prefill(sampler.prepare(np.ones((1, 10), np.int32), max_new_tokens=8), params)
  compiled = sampler._decode.lower(sampler.state, carry, jnp.int32(8), params.arrays(), sampling.stop_array((1,)),
                                   do_sample=False, attention=attention).compile()
  stacked = [v for _, v in nnx.to_flat_state(nnx.state(model.llm.model.layers, nnx.Param))]
  shapes = sorted({hlo_shape(v.shape, v.dtype) for v in stacked})
  text = compiled.as_text()
  assert stacked_weight_copies(text, shapes) == []
  assert compiled.memory_analysis().temp_size_in_bytes < sum(v.nbytes for v in stacked) / 2
  # the check can fail: a copy of a stack is reported
  fake = "  %copy.1 = f32[4,128,512]{2,1,0} copy(%param.3)"
  assert stacked_weight_copies(text + "\n" + fake, shapes) == [fake.strip()]


def test_stacked_vectors_get_no_weight_decay():
  model = qwen(2)
  assert not is_matrix(model.model.layers.input_layernorm.scale)  # [L, D]
  assert not is_matrix(model.model.layers.self_attn.q_proj.bias)  # [L, out]
  assert is_matrix(model.model.layers.self_attn.q_proj.kernel)  # [L, in, out]
  assert is_matrix(model.model.embed_tokens.embedding) and not is_matrix(model.model.norm.scale)


def test_a_per_layer_format_1_checkpoint_is_refused_with_advice(tmp_path):
  model = qwen(1)
  path = checkpoint.save_model(tmp_path / "ckpt", model)
  meta = json.loads((path / checkpoint.METADATA_FILE).read_text())
  assert meta["format_version"] == checkpoint.FORMAT_VERSION == 2
  meta["format_version"] = 1
  (path / checkpoint.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError, match=r"format_version 1.*python -m convert hf SRC"):
    checkpoint.load_module(path)


def test_decode_updates_the_kv_cache_in_place():
  """The cache travels whole through the layer scan and each step writes one position of it: the compiled decode
  loop (sampler) and engine step hold less than one cache in temporaries (rebuilt per step, they held ~1.75)."""
  cfg = load_config("tiny-static", ["llm.num_hidden_layers=4", "llm.vocab_size=512"])
  model = FlashVLModel(cfg, rngs=nnx.Rngs(0))
  sampler = sampling.Sampler(model)
  params = sampling.SamplingParams()
  carry = sampler.prefill(sampler.prepare(np.ones((4, 10), np.int32), max_new_tokens=2000), params)
  compiled = sampler._decode.lower(sampler.state, carry, jnp.int32(8), params.arrays(), sampling.stop_array((1,)),
                                   do_sample=False, attention="xla").compile()
  cache_bytes = sum(v.nbytes for v in carry.cache.values())
  assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 2
  engine = Engine(model, slots=8, max_seq_len=2048, attention="xla")
  compiled = engine._decode.lower(engine.state, engine._slots, jnp.ones((8,), bool), sampling.stop_array((1,)),
                                  width=8).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < sum(v.nbytes for v in engine._slots.cache.values()) / 2
