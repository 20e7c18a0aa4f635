"""The sampler against transformers' `generate` on the same tiny weights, and its own invariants.

The reference is the PyTorch composite (`TorchFlashVL`: HF SigLIP + adapter + HF Qwen2 with an untied head, so
greedy outputs vary) written in the released layout and loaded by us. Greedy runs are compared token by token;
a step where the reference's top-2 logits are closer than `TIE_MARGIN` ends the comparison of that prompt (fp32
logits agree to ~1e-5, so only near-ties could flip).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from flashvl_jax import sampling, sharding
from flashvl_jax.api import FlashVL
from flashvl_jax.config import load_config
from flashvl_jax.models import layers
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.testing.tiny_qwen2 import build_tiny_qwen2
from flashvl_jax.testing.tiny_vision import build_tiny_siglip
from flashvl_jax.testing.torch_flashvl import build_tiny_flashvl, save_released_layout
from flashvl_jax.weights.flashvl import load_flashvl

VOCAB = 160
IMAGE_TOKENS = 4  # tiny SigLIP: 32 px / 8 px patches = 4x4 grid, shuffled 2x2
STOP = 121  # an ordinary id that ends 15 of the 26 greedy references early (the others run to NEW)
NEW = 24
TIE_MARGIN = 1e-3
N_PROMPTS = 26  # 20 with an image, every fourth text-only
BATCH_ROWS = [2, 4, 7, 9, 13, 14, 19, 22]  # 31..156 tokens: one batch shape (8 rows, bucket 256) for 3 tests


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  root = tmp_path_factory.mktemp("sampling")
  vit = build_tiny_siglip(root / "siglip", seed=11)
  llm = build_tiny_qwen2(root / "qwen2", seed=12, tied=False)
  ref = build_tiny_flashvl(vit, llm, intermediate=96, seed=13)
  save_released_layout(ref, root / "flashvl", image_token_num=IMAGE_TOKENS)
  return ref, FlashVL(load_flashvl(root / "flashvl"))


@pytest.fixture(scope="module")
def prompts():
  """(ids, uint8 pixels or None) with 2..202 tokens: two prompt buckets (128, 256); every fourth is text-only."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(N_PROMPTS):
    before, after = rng.integers(1, 100, 2)
    text = lambda n: rng.integers(0, VOCAB, n).tolist()
    if i % 4 == 3:
      out.append((np.asarray(text(before + after), np.int32), None))
    else:
      image = [-200] + [-201] * (IMAGE_TOKENS - 1)
      pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
      out.append((np.asarray(text(before) + image + text(after), np.int32), pixels))
  return out


def torch_greedy(ref, ids, pixels, new=NEW):
  """transformers' greedy `generate` on one prompt: (new tokens, top-1 minus top-2 logit per step)."""
  host = None if pixels is None else torch.from_numpy((pixels[None].astype(np.float32) / 255 - 0.5) / 0.5)
  with torch.no_grad():
    embeds = ref.embed(torch.from_numpy(ids[None].astype(np.int64)), None if host is None else host.permute(0, 3, 1, 2))
    out = ref.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                           do_sample=False, max_new_tokens=new, eos_token_id=STOP, pad_token_id=0,
                           return_dict_in_generate=True, output_logits=True)
  top2 = torch.stack(out.logits)[:, 0].topk(2).values.numpy()
  return out.sequences[0].tolist(), top2[:, 0] - top2[:, 1]


@pytest.fixture(scope="module")
def references(pair, prompts):
  return [torch_greedy(pair[0], ids, pixels) for ids, pixels in prompts]


def one(model, ids, pixels, **kw):
  kw.setdefault("max_new_tokens", NEW)
  kw.setdefault("stop_ids", (STOP,))
  pixel_values = None if pixels is None else pixels[None]
  return model.generate(input_ids=ids[None], pixel_values=pixel_values, **kw)[0]


def right_padded(prompts):
  """A Processor-style batch: rows right-padded with 0, zero tiles for text-only rows."""
  length = max(len(ids) for ids, _ in prompts)
  ids = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros_like(ids)
  pixels = np.zeros((len(prompts), 1, 32, 32, 3), np.uint8)
  for row, (p, px) in enumerate(prompts):
    ids[row, :len(p)], mask[row, :len(p)] = p, 1
    if px is not None:
      pixels[row, 0] = px
  return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


@pytest.fixture(scope="module")
def singles(pair, prompts):
  return [one(pair[1], ids, pixels) for ids, pixels in prompts]


def test_greedy_matches_transformers(prompts, references, singles):
  assert len({sampling.bucket_length(len(ids)) for ids, _ in prompts}) == 2
  full = 0
  for (ids, _), (expected, margins), got in zip(prompts, references, singles):
    ties = np.flatnonzero(margins < TIE_MARGIN)
    n = ties[0] if ties.size else len(expected)
    assert got[:n] == expected[:n], (len(ids), got, expected)
    full += not ties.size and got == expected
  assert full >= N_PROMPTS - 2, full  # near-ties are rare: at most two prompts compared only up to one
  stopped = sum(1 for got in singles if got[-1] == STOP)
  assert 0 < stopped < len(singles)  # some rows stop early at the stop id (included), others run to NEW
  assert all(len(got) == NEW for got in singles if got[-1] != STOP)


def test_batch_of_mixed_lengths_equals_one_by_one(pair, prompts, singles):
  lengths = [len(prompts[r][0]) for r in BATCH_ROWS]
  assert min(lengths) < 60 and max(lengths) > 128
  batch = right_padded([prompts[r] for r in BATCH_ROWS])
  got = pair[1].generate(**batch, max_new_tokens=NEW, stop_ids=(STOP,))
  assert got == [singles[r] for r in BATCH_ROWS]


def test_left_padded_input_equals_right_padded(pair, prompts, singles):
  batch = right_padded([prompts[r] for r in BATCH_ROWS])
  flipped = {k: np.stack([np.roll(row, len(row) - m.sum()) for row, m in zip(v, batch["attention_mask"])])
             for k, v in batch.items() if k != "pixel_values"}
  assert flipped["attention_mask"][:, -1].all() and not flipped["attention_mask"][:, 0].all()
  got = pair[1].generate(**flipped, pixel_values=batch["pixel_values"], max_new_tokens=NEW,
                          stop_ids=(STOP,))
  assert got == [singles[r] for r in BATCH_ROWS]


def test_cached_decode_equals_recomputation(pair, prompts, singles):
  """Teacher-forcing the generated tokens through the cache-free forward reproduces every greedy choice."""
  rows = range(8)
  sequences = [(np.concatenate([prompts[r][0], np.asarray(singles[r][:-1], np.int32)]), prompts[r][1]) for r in rows]
  batch = right_padded(sequences)
  forward = jax.jit(lambda ids, pixels, mask: pair[1].module(ids, pixels, mask))
  logits = np.asarray(forward(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]))
  for r in rows:
    start, n = len(prompts[r][0]) - 1, len(singles[r])
    scores = logits[r, start:start + n]
    top2 = np.sort(scores, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > TIE_MARGIN
    assert scores.argmax(-1).tolist() == singles[r]


@pytest.fixture(scope="module")
def sampling_model(pair):
  """The same weights in a new module object, so it gets its own sampler: the do_sample=True compilations."""
  return FlashVL(nnx.merge(*nnx.split(pair[1].module)), pair[1].processor)


def test_no_recompilation_inside_a_bucket(sampling_model, prompts):
  model = sampling_model
  sampler = model.sampler
  short = [p for p in prompts if len(p[0]) <= 128 and p[1] is not None][:3]
  assert len({len(ids) for ids, _ in short}) == 3
  one(model, *short[0], do_sample=True)
  compiled = dict(sampler.trace_counts)
  assert compiled["prefill"] >= 1 and compiled["decode"] >= 1
  for (ids, pixels), new, top_k in zip(short, (5, 17, 32), (0, 3, 10)):
    one(model, ids, pixels, max_new_tokens=new, do_sample=True, top_k=top_k, temperature=new / 10,
        stop_ids=(STOP,) * (new % 3))
  list(sampling.stream(sampler, input_ids=short[1][0][None], pixel_values=short[1][1][None], chunk_size=3,
                       max_new_tokens=20, do_sample=True))
  assert dict(sampler.trace_counts) == compiled
  one(model, *short[1], max_new_tokens=40, do_sample=True)  # decode bucket 64: a new cache length
  assert dict(sampler.trace_counts) == {k: v + 1 for k, v in compiled.items()}


def test_stream_chunks_join_to_generate(pair, prompts, singles):
  """Streams the 8-row batch of the batch test (no new compilation) in chunks of 5 tokens."""
  rows = BATCH_ROWS
  chunks = list(sampling.stream(pair[1].sampler, **right_padded([prompts[r] for r in rows]), max_new_tokens=NEW,
                                stop_ids=(STOP,), chunk_size=5))
  assert all(len(c) == 1 for c in chunks[0])
  assert len(chunks) == 1 + (NEW - 1 + 4) // 5
  joined = [sum((c[i] for c in chunks), []) for i in range(len(rows))]
  assert joined == [singles[r] for r in rows]
  stopped = [i for i, r in enumerate(rows) if len(singles[r]) < NEW - 5]
  assert stopped and all(chunks[-1][i] == [] for i in stopped)  # nothing after a row's stop id


def test_sharded_generation_equals_single_device(pair, prompts, singles):
  module = pair[1].module
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(module)
  sharded = FlashVL(nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh))),
                    pair[1].processor, mesh)
  rows = list(range(8))
  got = sharded.generate(**right_padded([prompts[r] for r in rows]), max_new_tokens=NEW, stop_ids=(STOP,))
  assert got == [singles[r] for r in rows]
  sampler = sharded.sampler
  assert len(sampler.state["llm"]["model"]["embed_tokens"]["embedding"][...].sharding.device_set) == 8


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair, sampling_model, prompts):
  ids, pixels = prompts[4]  # in the bucket that test_no_recompilation_inside_a_bucket compiles
  sample = lambda **kw: one(sampling_model, ids, pixels, do_sample=True, stop_ids=(), **kw)
  a, b, c = sample(seed=1, temperature=1.5), sample(seed=1, temperature=1.5), sample(seed=2, temperature=1.5)
  assert a == b and a != c
  greedy = one(pair[1], ids, pixels, stop_ids=())
  assert a != greedy
  assert sample(seed=3, top_k=1) == greedy
  assert sample(seed=3, top_p=1e-6, temperature=2.0) == greedy  # the nucleus keeps only the top token
  assert sample(seed=3, top_k=3, top_p=0.9) != greedy


def test_sample_tokens_distribution():
  probs = np.asarray([0.05, 0.4, 0.1, 0.25, 0.2])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(20000, axis=0)
  draw_fn = jax.jit(sampling.sample_tokens, static_argnames="do_sample")
  draw = lambda do_sample=True, temperature=1.0, top_k=0, top_p=1.0: np.bincount(np.asarray(draw_fn(
      logits, jax.random.key(0), *sampling.SamplingParams(do_sample, temperature, top_k, top_p).arrays(),
      do_sample=do_sample)), minlength=5) / len(logits)
  np.testing.assert_array_equal(draw(do_sample=False), [0, 1, 0, 0, 0])
  np.testing.assert_allclose(draw(), probs, atol=0.015)
  np.testing.assert_allclose(draw(temperature=2.0), probs**0.5 / (probs**0.5).sum(), atol=0.015)
  np.testing.assert_allclose(draw(top_k=2), [0, 0.4 / 0.65, 0, 0.25 / 0.65, 0], atol=0.015)
  # top-p 0.7: 0.4 + 0.25 < 0.7, so 0.2 joins the nucleus; 0.1 and 0.05 are cut
  np.testing.assert_allclose(draw(top_p=0.7), [0, 0.4 / 0.85, 0, 0.25 / 0.85, 0.2 / 0.85], atol=0.015)
  np.testing.assert_allclose(draw(top_k=3, top_p=0.5), [0, 0.4 / 0.65, 0, 0.25 / 0.65, 0], atol=0.015)


def test_draws_do_not_follow_the_sorted_order_of_ties():
  """Logits equal up to rounding (e.g. computed on another device layout) give the same token: the filters cut
  in sorted order but the draw is over the vocabulary in its own order. Many exact ties, half of them nudged
  by one ulp: drawing in sorted order (as before) picked the same token for 11 of 200 keys."""
  rng = np.random.default_rng(0)
  tied = np.round(rng.normal(size=(1, 4096)), 1).astype(np.float32)
  nudged = np.where(rng.random(tied.shape) < 0.5, np.nextafter(tied, np.float32(np.inf)), tied)
  draw = jax.jit(lambda logits, key: sampling.sample_tokens(logits, key, 1.0, 0, 0.99, do_sample=True))
  for seed in range(200):
    assert int(draw(tied, jax.random.key(seed))[0]) == int(draw(nudged, jax.random.key(seed))[0])
  filtered = np.asarray(sampling.filter_logits(jnp.asarray([[3.0, 1.0, 2.0, 2.0, 0.0]]), 3, 1.0))
  np.testing.assert_array_equal(filtered, [[3.0, -np.inf, 2.0, 2.0, -np.inf]])  # top-3 keeps the tie at the cut


def test_bucket_length():
  lengths = (1, 127, 128, 129, 300, 1024, 1025)
  assert [sampling.bucket_length(n) for n in lengths] == [128, 128, 128, 256, 512, 1024, 2048]
  assert sampling.bucket_length(128, sampling.MIN_DECODE_BUCKET) == 128
  assert sampling.bucket_length(5, sampling.MIN_DECODE_BUCKET) == 32


def test_input_errors(pair, prompts):
  model = pair[1]
  ids, pixels = prompts[0]
  limit = model.config.llm.max_position_embeddings
  with pytest.raises(ValueError, match=f"needs {len(ids) + limit} positions but the limit is {limit}"):
    one(model, ids, pixels, max_new_tokens=limit)
  with pytest.raises(ValueError, match="the limit is 40 .max_length."):
    one(model, ids, pixels, max_length=40, max_new_tokens=40)
  with pytest.raises(ValueError, match="no pixel_values"):
    one(model, ids, None)
  with pytest.raises(ValueError, match=f"id {VOCAB} but the model's vocabulary has {VOCAB}"):
    one(model, np.append(ids, VOCAB), pixels)
  with pytest.raises(ValueError, match="row 0: 4 placeholders vs 5 image tokens"):
    one(model, ids, pixels, num_image_tokens=[5])
  with pytest.raises(ValueError, match="temperature must be > 0"):
    one(model, ids, pixels, do_sample=True, temperature=0.0)


@pytest.mark.parametrize("mask_heads", [1, 8])
def test_attention_implementations_agree(monkeypatch, mask_heads):
  """'looped' (one (batch, KV head) pair at a time) and the 'cudnn' branch's call of `jax.nn.dot_product_attention`
  (mask layout, GQA, scale; run by its XLA backend on CPU) equal the all-heads 'xla' path, with a mask shared by
  the heads or one per head; on a GPU the cuDNN kernel itself is checked in bf16."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 16, 8, 64), (2, 24, 2, 64), (2, 24, 2, 64)))
  causal = jnp.arange(24)[None, :] <= jnp.arange(16)[:, None] + 8
  mask = causal[None, None] & (jnp.arange(24)[None, :] >= jnp.asarray([[3], [0]]))[:, None, None]  # [2, 1, 16, 24]
  if mask_heads > 1:  # head h also hides its first h keys
    mask = mask & (jnp.arange(24)[None, :] >= jnp.arange(mask_heads)[:, None])[None, :, None]
  run = lambda implementation, *qkv: jax.jit(
      lambda q, k, v: layers.attention(q, k, v, scale=0.125, mask=mask, implementation=implementation))(*qkv)
  expected = run("xla", q, k, v)
  np.testing.assert_allclose(run("looped", q, k, v), expected, atol=1e-5)
  unmasked = jax.jit(lambda q, k, v, implementation: layers.attention(q, k, v, scale=0.125,
                                                                      implementation=implementation),
                     static_argnames="implementation")
  np.testing.assert_allclose(unmasked(q, k, v, "looped"), unmasked(q, k, v, "xla"), atol=1e-5)
  if jax.default_backend() == "gpu":
    got = run("cudnn", *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2)
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: real(*a, **{**kw, "implementation": "xla"}))
  np.testing.assert_allclose(run("cudnn", q, k, v), expected, atol=1e-5)
  with pytest.raises(ValueError, match="unknown attention implementation"):
    layers.attention(q, k, v, scale=0.125, implementation="flash")


def test_attention_argument_reaches_both_towers_of_the_traced_copy_only():
  """Prefill's `attention` reaches the vision tower's and the LLM's attention modules, decode's the LLM's, in the
  traced copy only: the sampler's own module keeps 'xla' as built. 'auto' is 'looped' on CPU."""
  cfg = load_config("tiny-static")
  model = FlashVLModel(cfg, rngs=nnx.Rngs(0))
  sampler = sampling.Sampler(model)
  batch = Processor.from_preset(cfg)([Image.new("RGB", (64, 64))], [[{"role": "user", "content": "Hi"}]],
                                     add_generation_prompt=True)
  seen = []
  real = layers.attention
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(layers, "attention", lambda *a, implementation, **kw: (seen.append(implementation),
                                                                         real(*a, implementation=implementation,
                                                                              **kw))[1])
    params = sampling.SamplingParams()
    prompts = sampler.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                              batch["image_patch_index"], max_new_tokens=4)
    carry = sampler.prefill(prompts, params, attention="auto")
    prefill_calls = list(seen)
    sampler.decode(carry, 4, params, attention="xla")
  assert (sampling.resolve_attention(cfg, "auto") == "looped"
          == sampling.resolve_attention(cfg, "auto", decode=True))
  assert prefill_calls == ["looped", "looped"]  # one traced call per scanned stack: vision tower, LLM
  assert set(seen[len(prefill_calls):]) == {"xla"}
  assert {m.implementation for _, m in nnx.iter_modules(model) if isinstance(m, layers.AttentionModule)} == {"xla"}
  with pytest.raises(ValueError, match="unknown attention implementation"):
    layers.set_attention(model, "flash")


def test_full_size_iss_prefill_and_decode_shapes():
  """The 2B ISS preset through the sampler, traced abstractly (no weights, no compute): cache and token shapes."""
  cfg = load_config("flashvl-2b-dynamic-iss")
  sampler = sampling.Sampler(nnx.eval_shape(lambda: FlashVLModel(cfg, rngs=nnx.Rngs(0))))
  image = Image.fromarray(np.zeros((1000, 1000, 3), np.uint8))
  batch = Processor.from_preset(cfg)([image], [[{"role": "user", "content": "Describe the image."}]],
                                     add_generation_prompt=True)
  assert batch["num_image_tokens"].tolist() == [576]
  prompts = sampler.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            batch["image_patch_index"], max_new_tokens=128)
  params = sampling.SamplingParams()
  knobs, stop = params.arrays(), jnp.zeros((sampling.STOP_SLOTS,), jnp.int32)
  carry = jax.eval_shape(lambda state: sampler._prefill(  # pylint: disable=protected-access
      state, prompts.input_ids, prompts.attention_mask, prompts.pixel_values, prompts.image_patch_index,
      jax.random.key(0), knobs, stop, decode_length=128, do_sample=False, attention="xla"), sampler.state)
  assert carry.cache["k"].shape == (28, 1, 1024 + 128, 2, 128) and carry.cache["k"].dtype == jnp.bfloat16
  assert carry.tokens.shape == (1, 128)
  out = jax.eval_shape(lambda state, carry: sampler._decode(  # pylint: disable=protected-access
      state, carry, jnp.int32(128), knobs, stop, do_sample=False, attention="looped"), sampler.state, carry)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == jax.tree.map(lambda a: (a.shape, a.dtype), carry)


@pytest.mark.parametrize("vocab", [151936, 160, 4099, 3 * 8192])
def test_greedy_tokens_is_argmax_with_its_tie_rule(vocab):
  rng = np.random.default_rng(vocab)
  ties = rng.integers(0, 4, (6, vocab)).astype(np.float32)  # many equal maxima: the first one wins
  smooth = rng.standard_normal((3, vocab)).astype(np.float32)
  for logits in (ties, smooth):
    assert (np.asarray(jax.jit(sampling.greedy_tokens)(logits)) == logits.argmax(-1)).all()
