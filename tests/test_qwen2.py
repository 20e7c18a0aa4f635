"""Qwen2ForCausalLM parity against transformers (tiny random checkpoints), KV cache, packing, weight table."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from flashvl_jax.config import ConfigError, LLMConfig
from flashvl_jax.models import layers
from flashvl_jax.models import qwen2 as qwen2_model
from flashvl_jax.models.qwen2 import Qwen2ForCausalLM
from flashvl_jax.weights.qwen2 import load_qwen2
from flashvl_jax.testing.tiny_qwen2 import TINY_QWEN2, build_tiny_qwen2, tiny_qwen2_config
from flashvl_jax.weights import qwen2 as qwen2_weights
from flashvl_jax.weights.hf_io import read_hf_config
from flashvl_jax.weights.mapping import WeightMappingError
from flashvl_jax.testing.mesh import sharded_call

TOL = 1e-4  # fp32 logits of magnitude 3-25
CACHE_TOL = 1e-5
VOCAB = TINY_QWEN2["vocab_size"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """Tiny HF checkpoints: tied (v5 and v4 config spellings, same weights) and untied."""
  root = tmp_path_factory.mktemp("qwen2")
  out = {}
  for name, kw in {"tied": dict(tied=True), "untied": dict(tied=False, seed=1),
                   "tied_v4": dict(tied=True, config_style="v4")}.items():
    out[name] = (root / name, build_tiny_qwen2(root / name, **kw))
  return out


@pytest.fixture(scope="session")
def ours(tiny):
  return {name: load_qwen2(tiny[name][0]) for name in ("tied", "untied")}


def torch_logits(ref, ids=None, embeds=None, mask=None, positions=None) -> np.ndarray:
  as_t = lambda a: None if a is None else torch.tensor(np.asarray(a))
  with torch.no_grad():
    out = ref(input_ids=as_t(ids), inputs_embeds=as_t(embeds), attention_mask=as_t(mask), position_ids=as_t(positions))
  return out.logits.numpy()


def random_ids(shape, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


def left_pad_inputs(lengths, total: int):
  mask = np.zeros((len(lengths), total), np.int32)
  for b, n in enumerate(lengths):
    mask[b, total - n:] = 1
  return mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def max_diff(a, b, where=None) -> float:
  d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return float(d[where].max() if where is not None else d.max())


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_logits_match_torch(tiny, ours, name):
  ids = random_ids((2, 12))
  expected = torch_logits(tiny[name][1], ids)
  got = ours[name](jnp.asarray(ids))
  assert got.dtype == jnp.float32 and got.shape == (2, 12, VOCAB)
  err = max_diff(got, expected)
  print(f"{name}: max abs diff {err:.2e}, logits max {np.abs(expected).max():.1f}")
  assert np.abs(expected).max() > 3.0
  assert err <= TOL
  assert hasattr(ours[name], "lm_head") == (name == "untied")


def test_left_padding_matches_torch(tiny, ours):
  ids = random_ids((2, 12), seed=1)
  mask, positions = left_pad_inputs([12, 7], 12)
  valid = mask.astype(bool)
  expected = torch_logits(tiny["tied"][1], ids, mask=mask, positions=positions)
  got = ours["tied"](jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(positions))
  err = max_diff(got, expected, valid)
  print(f"left padding: max abs diff {err:.2e} on valid positions")
  assert err <= TOL
  assert np.isfinite(np.asarray(got)).all()  # fully masked pad rows attend uniformly, never NaN
  unmasked = ours["tied"](jnp.asarray(ids), position_ids=jnp.asarray(positions))
  assert max_diff(unmasked, expected, valid) > 1e-2  # the mask matters


def test_inputs_embeds_at_positions_near_30000(tiny, ours):
  embeds = (np.random.RandomState(2).randn(2, 12, 64) * 0.5).astype(np.float32)
  positions = np.broadcast_to(30_000 + np.arange(12, dtype=np.int32), (2, 12)) + np.array([[0], [517]], np.int32)
  expected = torch_logits(tiny["tied"][1], embeds=embeds, positions=positions)
  got = ours["tied"](inputs_embeds=jnp.asarray(embeds), position_ids=jnp.asarray(positions))
  err = max_diff(got, expected)
  print(f"positions ~30000: max abs diff {err:.2e}")
  assert err <= TOL


def cached_forward(model, ids, prompt_len: int, max_len: int, slot_mask=None, positions=None):
  """Prefill `prompt_len` tokens, then feed the rest one at a time through a jitted step.

  Returns (logits [B, T, V], number of traces of the step function).
  """
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def step(state, cache, tokens, index, slot_mask, positions):
    traces.append(tokens.shape)
    return nnx.merge(graphdef, state)(tokens, cache=cache, cache_index=index, attention_mask=slot_mask,
                                      position_ids=positions)

  b, t = ids.shape
  pos = lambda lo, hi: None if positions is None else jnp.asarray(positions[:, lo:hi])
  cache = model.init_cache(b, max_len)
  logits, cache = step(state, cache, jnp.asarray(ids[:, :prompt_len]), jnp.int32(0), slot_mask, pos(0, prompt_len))
  out = [logits]
  for i in range(prompt_len, t):
    logits, cache = step(state, cache, jnp.asarray(ids[:, i:i + 1]), jnp.int32(i), slot_mask, pos(i, i + 1))
    out.append(logits)
  return np.concatenate([np.asarray(x) for x in out], axis=1), len(traces)


def test_kv_cache_decode_equals_full_forward(ours):
  model = ours["tied"]
  ids = random_ids((2, 12), seed=3)
  full = np.asarray(model(jnp.asarray(ids)))
  cached, traces = cached_forward(model, ids, prompt_len=8, max_len=16)
  err = max_diff(cached, full)
  print(f"kv cache: max abs diff {err:.2e}")
  assert err <= CACHE_TOL
  assert traces == 2  # prefill + one decode trace reused for every cache_index


def test_kv_cache_left_padded_mixed_lengths(ours):
  model = ours["tied"]
  ids = random_ids((2, 12), seed=4)
  mask, positions = left_pad_inputs([12, 9], 12)  # prompts of 8 and 5 tokens (left-padded to 8), 4 decoded
  valid = mask.astype(bool)
  full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(positions)))
  slot_mask = jnp.asarray(np.concatenate([mask, np.ones((2, 4), np.int32)], axis=1))  # S = 16
  cached, _ = cached_forward(model, ids, 8, 16, slot_mask=slot_mask, positions=positions)
  err_full = max_diff(cached, full, valid)
  alone = np.asarray(model(jnp.asarray(ids[1:, 3:])))  # the short row run without padding
  err_alone = max_diff(cached[1, 3:], alone[0])
  print(f"kv cache, left padded: {err_full:.2e} vs padded full forward, {err_alone:.2e} vs the row alone")
  assert err_full <= CACHE_TOL and err_alone <= CACHE_TOL


def test_packed_rows_equal_separate_sequences(tiny, ours):
  ref, model = tiny["tied"][1], ours["tied"]
  a, b = random_ids((1, 5), seed=5), random_ids((1, 6), seed=6)
  pad = np.zeros((1, 1), np.int32)
  ids = np.concatenate([np.concatenate([a, b, pad], 1), np.concatenate([b, a, pad], 1)])
  segments = np.array([[1] * 5 + [2] * 6 + [0], [1] * 6 + [2] * 5 + [0]], np.int32)
  positions = np.array([list(range(5)) + list(range(6)) + [0], list(range(6)) + list(range(5)) + [0]], np.int32)
  got = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(segments), position_ids=jnp.asarray(positions)))
  la, lb = torch_logits(ref, a)[0], torch_logits(ref, b)[0]
  errs = [max_diff(got[0, :5], la), max_diff(got[0, 5:11], lb), max_diff(got[1, :6], lb), max_diff(got[1, 6:11], la)]
  print(f"packing: max abs diff {max(errs):.2e}")
  assert max(errs) <= TOL
  unpacked = np.asarray(model(jnp.asarray(ids), position_ids=jnp.asarray(positions)))
  assert max_diff(unpacked[0, 5:11], lb) > 1e-2  # without segment_ids the second sequence sees the first


def test_v4_and_v5_config_spellings(tiny, ours):
  v5, v4 = read_hf_config(tiny["tied"][0]), read_hf_config(tiny["tied_v4"][0])
  assert "rope_parameters" in v5 and "dtype" in v5 and "rope_theta" not in v5
  assert "rope_theta" in v4 and "torch_dtype" in v4 and "rope_parameters" not in v4
  cfg5, cfg4 = qwen2_weights.config_from_hf(v5), qwen2_weights.config_from_hf(v4)
  assert cfg5 == cfg4
  assert cfg5 == LLMConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768)
  ids = jnp.asarray(random_ids((1, 6)))
  assert max_diff(load_qwen2(tiny["tied_v4"][0])(ids), ours["tied"](ids)) == 0.0


def test_hf_config_round_trip():
  from transformers import Qwen2Config

  cfg = LLMConfig()
  hf = qwen2_weights.hf_config_from(cfg)
  assert qwen2_weights.config_from_hf(hf) == cfg
  loaded = Qwen2Config.from_dict(json.loads(json.dumps(hf)))
  assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
  assert loaded.tie_word_embeddings and loaded.num_key_value_heads == 2 and loaded.head_dim == 128
  assert set(loaded.layer_types) == {"full_attention"}


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}), "linear"),
    (dict(use_sliding_window=True, max_window_layers=1), "sliding"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_config_rejects_unsupported(tiny, change, message):
  hf = {**read_hf_config(tiny["tied_v4"][0]), **change}
  with pytest.raises(ConfigError, match=message):
    qwen2_weights.config_from_hf(hf)


def interleaved_rope(x, cos, sin):
  half = x.shape[-1] // 2
  c, s = (jnp.repeat(t[..., :half], 2, axis=-1)[:, :, None] for t in (cos, sin))
  rotated = jnp.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
  return x * c + rotated * s


def kv_expanded_attention(expand):
  """`attention` with KV heads expanded to all query heads by `expand` (jnp.repeat is HF's mapping)."""
  real = layers.attention

  def attn(q, k, v, **kw):
    group = q.shape[2] // k.shape[2]
    return real(q, expand(k, group), expand(v, group), **kw)

  return attn


def zero_qkv_biases(model):
  attn = model.model.layers.self_attn  # stacked: one module for every layer
  for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
    proj.bias.set_value(jnp.zeros_like(proj.bias[...]))


MISTAKES = {
    "interleaved_rope": (qwen2_model, "apply_rope", interleaved_rope),
    "tiled_gqa": (layers, "attention", kv_expanded_attention(lambda x, g: jnp.tile(x, (1, 1, g, 1)))),
    "theta_1e4": (qwen2_model, "rope_cos_sin", lambda pos, dim, theta, dtype: layers.rope_cos_sin(pos, dim, 1e4, dtype)),
    "no_qkv_bias": None,
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_plausible_mistakes_break_tolerance(tiny, monkeypatch, mistake):
  ids = random_ids((2, 12))
  expected = torch_logits(tiny["tied"][1], ids)
  model = load_qwen2(tiny["tied"][0])
  if MISTAKES[mistake] is None:
    zero_qkv_biases(model)
  else:
    monkeypatch.setattr(*MISTAKES[mistake])
  err = max_diff(model(jnp.asarray(ids)), expected)
  print(f"{mistake}: max abs diff {err:.2e}")
  assert err > 100 * TOL


def test_repeated_gqa_control(tiny, monkeypatch):
  """The expansion hook used for the tiled-GQA mistake passes with HF's repeat-interleave mapping."""
  ids = random_ids((2, 12))
  model = load_qwen2(tiny["tied"][0])
  monkeypatch.setattr(layers, "attention", kv_expanded_attention(lambda x, g: jnp.repeat(x, g, axis=2)))
  assert max_diff(model(jnp.asarray(ids)), torch_logits(tiny["tied"][1], ids)) <= TOL


def test_bf16_against_fp32_torch(tiny):
  """bf16 params and compute vs the fp32 torch model, next to transformers' own bf16 run of the same weights."""
  ref = tiny["tied"][1]
  ids = random_ids((16, 32), seed=0)
  expected = torch_logits(ref, ids)
  with torch.no_grad():
    hf_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(torch.tensor(ids)).logits.float().numpy()
  model = load_qwen2(tiny["tied"][0], dtype="bfloat16", param_dtype="bfloat16")
  assert model.model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
  err, hf_err, scale = max_diff(got, expected), max_diff(hf_bf16, expected), np.abs(expected).max()
  disagree = got.argmax(-1) != expected.argmax(-1)
  top2 = np.sort(expected, axis=-1)[..., -2:]
  margins = (top2[..., 1] - top2[..., 0])[disagree]
  print(f"bf16: max abs diff {err:.3f} (transformers bf16: {hf_err:.3f}; logits max {scale:.1f}), top-1 "
        f"agreement {1 - disagree.mean():.4f} over {ids.size} positions, fp32 top-2 margins where they differ "
        f"{[round(float(m), 3) for m in margins]}")
  assert 1 - disagree.mean() >= 0.99
  assert (margins < 2 * err).all()  # only near-ties flip
  assert err <= 1.5 * hf_err and err <= 0.02 * scale


def write_checkpoint(src, dst, edit):
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"))
  return dst


def test_mapping_errors_list_every_bad_key(tiny, tmp_path):

  def corrupt(t):
    del t["model.layers.0.mlp.up_proj.weight"]
    t["model.layers.1.self_attn.rotary.weight"] = np.zeros((4,), np.float32)
    t["model.norm.weight"] = np.ones((65,), np.float32)

  path = write_checkpoint(tiny["tied"][0], tmp_path / "bad", corrupt)
  with pytest.raises(WeightMappingError) as e:
    load_qwen2(path)
  msg = str(e.value)
  for text in ("missing", "model.layers.0.mlp.up_proj.kernel", "unexpected", "model.layers.1.self_attn.rotary.weight",
               "shape mismatches", "model.norm.weight (65,)"):
    assert text in msg, msg


def test_tied_checkpoint_with_lm_head_copy(tiny, ours, tmp_path):
  same = write_checkpoint(tiny["tied"][0], tmp_path / "same",
                          lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  ids = jnp.asarray(random_ids((1, 6)))
  assert max_diff(load_qwen2(same)(ids), ours["tied"](ids)) == 0.0
  other = write_checkpoint(tiny["tied"][0], tmp_path / "other",
                           lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
  with pytest.raises(WeightMappingError, match="tie_word_embeddings"):
    load_qwen2(other)


def test_untied_checkpoint_without_lm_head_fails(tiny, tmp_path):
  path = write_checkpoint(tiny["untied"][0], tmp_path / "nohead", lambda t: t.pop("lm_head.weight"))
  with pytest.raises(WeightMappingError, match="lm_head.kernel"):
    load_qwen2(path)


def test_bf16_checkpoint_loads(tiny, ours, tmp_path):
  """Released Qwen2 weights are bfloat16: they load into fp32 params as the exactly rounded values."""
  import ml_dtypes

  path = write_checkpoint(tiny["tied"][0], tmp_path / "bf16",
                          lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
  loaded = load_qwen2(path).model.layers.self_attn.k_proj.kernel[...][1]
  expected = ours["tied"].model.layers.self_attn.k_proj.kernel[...][1].astype(jnp.bfloat16).astype(jnp.float32)
  assert loaded.dtype == jnp.float32 and np.array_equal(loaded, expected)


def test_table_exports_hf_keys(tiny, ours):
  """Export plan: our parameters map back to exactly the checkpoint's keys, tensors bit-equal."""
  from flashvl_jax.weights.hf_io import param_arrays, param_shapes
  from flashvl_jax.weights.mapping import run_export

  for name in ("tied", "untied"):
    model = ours[name]
    plan = qwen2_weights.table(model.config).plan_export(param_shapes(model))
    arrays = param_arrays(model)
    exported = dict(run_export(plan, lambda p: np.asarray(arrays[p])))
    stored = load_file(str(tiny[name][0] / "model.safetensors"))
    assert set(exported) == set(stored)
    assert all(np.array_equal(exported[k], stored[k]) for k in stored)


def test_sharded_matches_unsharded(ours):
  """Params by their logical axes and a batch-sharded input on a (2, 2, 2) mesh give the same logits."""
  ids = jnp.asarray(random_ids((4, 12), seed=8))
  expected = np.asarray(jax.jit(lambda x: ours["untied"](x))(ids))
  got, sharded = sharded_call(ours["untied"], ids)
  assert len(sharded["model"]["layers"]["mlp"]["gate_proj"]["kernel"][...].sharding.device_set) == 8
  assert max_diff(got, expected) <= 1e-5


def test_full_size_parameter_count():
  model = nnx.eval_shape(lambda: Qwen2ForCausalLM(LLMConfig(), rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == 1_543_714_304  # Qwen2-1.5B / Qwen2.5-1.5B, tied (the model card's 1.54B)


def test_tiny_config_matches_fixture():
  cfg = tiny_qwen2_config()
  assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg._attn_implementation == "eager"
  assert cfg.hidden_size // cfg.num_attention_heads == 16
