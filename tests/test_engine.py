"""The continuous-batching engine (`flashvl_jax.engine`) in-process: token-identical to the sampler for any mix of
requests, per-request sampling independent of the batch, cancellation, no compilation after warm-up, a mesh."""

import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flashvl_jax.api import FlashVL
from flashvl_jax.config import load_config
from flashvl_jax.engine import CANCELLED, Engine, QueueFullError, Request
from flashvl_jax.models.flashvl import FlashVLModel
from flashvl_jax.sampling import InvalidRequestError, SamplingParams
from flashvl_jax.sharding import create_sharded, make_mesh

SEQ = 384


def picture(seed, size=(90, 70)):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


@pytest.fixture(scope="module")
def model():
  return FlashVL(FlashVLModel(load_config("tiny-iss"), rngs=nnx.Rngs(0)))


def encode(model, text, image=None):
  batch = model.processor([image], [[{"role": "user", "content": text}]], add_generation_prompt=True)
  real = batch["attention_mask"][0].astype(bool)
  pixels = None if image is None else (batch["pixel_values"][0], batch["image_patch_index"][0])
  return batch, batch["input_ids"][0][real], pixels


def request(model, name, text, n, image=None, **kwargs):
  _, ids, pixels = encode(model, text, image)
  return Request(name, ids, n, on_tokens=None, pixel_values=None if pixels is None else pixels[0],
                 image_patch_index=None if pixels is None else pixels[1], **kwargs)


@pytest.fixture(scope="module")
def engine(model):
  engine = Engine(model.module, slots=3, max_seq_len=SEQ, stop_ids=model.tokenizer.eos_ids, decode_steps=3)
  engine.warmup()
  engine.start()
  yield engine
  engine.stop()


def test_mixed_requests_equal_the_sampler_and_compile_nothing_new(model, engine):
  compiled = dict(engine.trace_counts)
  assert engine.prompt_buckets() == [128, 256, 383] and engine.decode_widths() == [1, 2, 3]
  assert compiled == {"admit": 2 * 3, "decode": 3}
  cases = [("hi", None, 5), ("what colour " * 40, picture(0), 9), ("x " * 150, None, 3), ("why?", picture(1), 14),
           ("tell me", None, 1), ("and this " * 3, picture(2, (200, 40)), 7)]
  requests = [request(model, f"r{i}", text, n, image) for i, (text, image, n) in enumerate(cases)]
  answers = engine.generate(requests, timeout=120)
  for (text, image, n), answer in zip(cases, answers):
    batch, _, _ = encode(model, text, image)
    assert answer == model.generate(**batch, max_new_tokens=n, stop_ids=model.tokenizer.eos_ids)[0]
  assert engine.trace_counts == compiled and engine.busy_slots == 0


def test_sampling_is_per_request_and_seeded(model, engine):
  params = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
  alone = engine.generate([request(model, "a", "sample me", 10, sampling=params, seed=7)], timeout=60)[0]
  crowd = [request(model, f"g{i}", "other text " * i, 12) for i in range(4)]
  again = engine.generate([*crowd[:2], request(model, "b", "sample me", 10, sampling=params, seed=7), *crowd[2:]],
                          timeout=60)[2]
  other = engine.generate([request(model, "c", "sample me", 10, sampling=params, seed=8)], timeout=60)[0]
  assert alone == again and alone != other and len(alone) == 10


def test_cancel_frees_the_slot_and_checks_refuse_bad_requests(model, engine):
  events = []
  long = request(model, "long", "go on", SEQ - 60)
  long.on_tokens = lambda new, reason: events.append(reason)
  engine.submit(long)
  engine.cancel("long")
  deadline = time.monotonic() + 30
  while CANCELLED not in events and time.monotonic() < deadline:
    time.sleep(0.01)
  assert events[-1] == CANCELLED and engine.busy_slots == 0
  with pytest.raises(InvalidRequestError, match="more than the 384"):
    engine.check(request(model, "big", "hi", SEQ))
  with pytest.raises(InvalidRequestError, match="max_new_tokens must be >= 1"):
    engine.check(request(model, "zero", "hi", 0))
  with pytest.raises(InvalidRequestError, match="no pixel_values"):
    engine.check(Request("img", np.asarray([1, -200, 2]), 3, on_tokens=None))


def test_a_full_queue_is_refused(model):
  engine = Engine(model.module, slots=1, max_seq_len=256, stop_ids=model.tokenizer.eos_ids, max_queue=2)
  for i in range(2):
    engine.submit(request(model, f"q{i}", "hi", 4))
  with pytest.raises(QueueFullError, match="retry later"):
    engine.submit(request(model, "q2", "hi", 4))


def test_engine_on_a_mesh_equals_one_device(model):
  mesh = make_mesh({"data": 2, "fsdp": 4})
  sharded = create_sharded(lambda: FlashVLModel(load_config("tiny-iss"), rngs=nnx.Rngs(0)), mesh)  # = `model`
  engine = Engine(sharded, slots=2, max_seq_len=256, stop_ids=model.tokenizer.eos_ids, mesh=mesh)
  for array, slot_axis in ((engine._slots.cache["k"], 1), (engine._slots.last, 0)):  # each device: its own slot
    assert array.sharding.spec[slot_axis] == "data"
    assert array.addressable_shards[0].data.shape[slot_axis] == 1
  engine.start()
  try:
    cases = [("hi", None, 6), ("look", picture(3), 5)]
    answers = engine.generate([request(model, f"m{i}", t, n, im) for i, (t, im, n) in enumerate(cases)], timeout=120)
  finally:
    engine.stop()
  for (text, image, n), answer in zip(cases, answers):
    batch, _, _ = encode(model, text, image)
    assert answer == model.generate(**batch, max_new_tokens=n, stop_ids=model.tokenizer.eos_ids)[0]


def test_complete_runs_requests_with_the_parameters_it_is_handed(model):
  """GRPO's path: an engine of an abstract module, given a state per call; more requests than slots and queue."""
  abstract = nnx.eval_shape(lambda: FlashVLModel(load_config("tiny-iss"), rngs=nnx.Rngs(0)))
  engine = Engine(abstract, slots=2, max_seq_len=SEQ, stop_ids=model.tokenizer.eos_ids, max_queue=2)
  cases = [("hi", None, 4), ("what is this", picture(3), 6), ("x " * 30, None, 5), ("and now?", picture(4), 3),
           ("more", None, 2)]
  requests = [request(model, f"c{i}", text, n, image) for i, (text, image, n) in enumerate(cases)]
  state = nnx.state(model.module)
  answers = engine.complete(requests, state)
  for (text, image, n), answer in zip(cases, answers):
    batch, _, _ = encode(model, text, image)
    assert answer == model.generate(**batch, max_new_tokens=n, stop_ids=model.tokenizer.eos_ids)[0]
  other = nnx.state(FlashVLModel(load_config("tiny-iss"), rngs=nnx.Rngs(1)))
  assert engine.complete([request(model, "d", "hi", 4)], other)[0] != answers[0]  # the state handed in is used
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(engine.state))  # its own again
  engine.start()
  try:
    with pytest.raises(RuntimeError, match="stop the host loop first"):
      engine.complete([request(model, "e", "hi", 2)], state)
  finally:
    engine.stop()
