"""make_dataset: determinism, exact resume from iterator state, process shards, packing, DPO batches, padding."""

import numpy as np
import pytest
from absl import flags

from flashvl_jax.config import load_config
from flashvl_jax.data.pipeline import encode_record, make_dataset
from flashvl_jax.data.synthetic import SyntheticConfig, SyntheticPreferences, SyntheticVQA
from flashvl_jax.preprocess.processor import Processor
from flashvl_jax.preprocess.tokenizer import load_tokenizer

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def processor():
  # tiny-iss: 56 px tiles of 7 px patches, margin 1, up to 4 tiles (9 tokens for a small square image).
  return Processor(load_config("tiny-iss"), load_tokenizer("qwen2.5"), max_length=MAX_LENGTH)


def _text_records(n, prefix=""):
  return [{"id": f"t{i}", "image": None, "messages": [{"role": "user", "content": "Say the number."},
                                                      {"role": "assistant", "content": f"{prefix}{i}"}]}
          for i in range(n)]


def _answers(batch, tokenizer, prefix=""):
  """The decoded answer tokens of each row (with packing: of each segment), '<|im_end|>' removed."""
  out = []
  for ids, mask, segments in zip(batch[prefix + "input_ids"], batch[prefix + "loss_mask"],
                                 batch.get("segment_ids", batch[prefix + "attention_mask"])):
    for s in np.unique(segments[segments > 0]):
      out.append(tokenizer.decode(ids[(mask > 0) & (segments == s)]))
  return out


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_one_epoch_yields_every_example_once_in_seeded_order(processor):
  def answers(**kw):
    ds = make_dataset(_text_records(20), processor, batch_size=4, shard_index=0, shard_count=1, **kw)
    return [a for b in ds for a in _answers(b, processor.tokenizer)]

  first = answers(seed=0)
  assert sorted(first, key=int) == [str(i) for i in range(20)]
  assert first != [str(i) for i in range(20)]  # shuffled
  assert answers(seed=0) == first
  other_seed = answers(seed=1)
  assert other_seed != first and sorted(other_seed) == sorted(first)
  assert answers(shuffle=False) == [str(i) for i in range(20)]


def test_batches_have_fixed_shapes_and_uint8_pixels(processor):
  vqa = SyntheticVQA(6, config=SyntheticConfig(image_size=112))
  (batch,) = list(make_dataset(vqa, processor, batch_size=4, shard_index=0, shard_count=1, shuffle=False))
  n_tiles, s = processor.max_tiles, processor.config.vision.image_size
  assert batch["pixel_values"].shape == (4, n_tiles, s, s, 3) and batch["pixel_values"].dtype == np.uint8
  assert batch["input_ids"].shape == (4, MAX_LENGTH) and batch["input_ids"].dtype == np.int32
  assert batch["image_patch_index"].shape == (4, processor.max_image_tokens, 4)
  expected = encode_record(vqa[2], processor)
  for k, v in expected.items():
    np.testing.assert_array_equal(batch[k][2], v, err_msg=k)
  assert _answers(batch, processor.tokenizer) == [vqa[i]["answer"] for i in range(4)]


def test_epochs_reshuffle_and_short_last_batch_is_padded_with_empty_rows(processor):
  batches = list(make_dataset(_text_records(5), processor, batch_size=3, num_epochs=2, drop_remainder=False,
                              shard_index=0, shard_count=1))
  assert len(batches) == 4 and all(b["input_ids"].shape == (3, MAX_LENGTH) for b in batches)
  answers = [a for b in batches for a in _answers(b, processor.tokenizer)]
  assert len(answers) == 10 and sorted(answers[:5]) == sorted(answers[5:]) == [str(i) for i in range(5)]
  assert answers[:5] != answers[5:]  # each epoch reshuffled
  last = batches[-1]
  assert last["attention_mask"][0].sum() > 0
  assert not last["attention_mask"][1:].any() and not last["loss_mask"][1:].any()
  dropped = list(make_dataset(_text_records(5), processor, batch_size=3, num_epochs=2, shard_index=0,
                              shard_count=1))
  assert len(dropped) == 3


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_state_resumes_exactly(processor, packing):
  records = SyntheticVQA(40, config=SyntheticConfig(image_size=56))
  kw = dict(batch_size=3, seed=7, num_epochs=None, shard_index=0, shard_count=1, num_threads=2, prefetch=2,
            packing=packing)
  it = iter(make_dataset(records, processor, **kw))
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  restored = iter(make_dataset(records, processor, **kw))
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 4), expected)


def test_threads_and_prefetch_do_not_change_batches(processor):
  records = SyntheticVQA(12, config=SyntheticConfig(image_size=56))
  kw = dict(batch_size=4, seed=3, shard_index=0, shard_count=1)
  reference = list(make_dataset(records, processor, num_threads=0, **kw))
  _assert_batches_equal(list(make_dataset(records, processor, num_threads=2, prefetch=2, **kw)), reference)


def test_process_shards_are_disjoint_and_cover_the_source(processor):
  shards = [[a for b in make_dataset(_text_records(11), processor, batch_size=1, shard_index=i, shard_count=2)
             for a in _answers(b, processor.tokenizer)] for i in range(2)]
  assert len(shards[0]) == 6 and len(shards[1]) == 5
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1], key=int) == [str(i) for i in range(11)]
  with pytest.raises(ValueError, match="shard_index 2 is not in"):
    make_dataset(_text_records(11), processor, batch_size=1, shard_index=2, shard_count=2)


def test_packing_concatenates_examples_and_points_images_at_their_own_tiles(processor):
  images = SyntheticVQA(6, config=SyntheticConfig(image_size=56))  # one tile and 9 image tokens each
  records = [images[i] for i in range(6)] + _text_records(4, prefix="text ")
  patches = processor.config.vision.num_patches
  kw = dict(batch_size=2, shuffle=False, shard_index=0, shard_count=1)
  packed = list(make_dataset(records, processor, packing=True, drop_remainder=False, **kw))
  singles = {ans: encode_record(r, processor)
             for r, ans in zip(records, [images[i]["answer"] for i in range(6)] + [f"text {i}" for i in range(4)])}
  seen = 0
  for batch in packed:
    for row in range(2):
      segment_ids, tile_used = batch["segment_ids"][row], batch["tile_mask"][row]
      row_answers = _answers({key: v[row:row + 1] for key, v in batch.items()}, processor.tokenizer)
      k = 0  # image tokens consumed in this row
      for s, answer in zip(np.unique(segment_ids[segment_ids > 0]), row_answers):
        where = segment_ids == s
        single = singles.pop(answer)
        n = int(single["attention_mask"].sum())
        np.testing.assert_array_equal(batch["input_ids"][row][where], single["input_ids"][:n])
        np.testing.assert_array_equal(batch["loss_mask"][row][where], single["loss_mask"][:n])
        np.testing.assert_array_equal(batch["position_ids"][row][where], np.arange(n))
        t = int(single["num_image_tokens"])
        got = batch["image_patch_index"][row][k:k + t]
        want = single["image_patch_index"][:t]
        np.testing.assert_array_equal(got % patches, want % patches)  # same patch of ...
        np.testing.assert_array_equal(batch["pixel_values"][row][got // patches],
                                      single["pixel_values"][want // patches])  # ... the same tile pixels
        k += t
        seen += 1
      assert batch["num_image_tokens"][row] == k == (batch["input_ids"][row] < 0).sum()
      assert tile_used.sum() * processor.config.tokens_per_tile >= k
      assert np.array_equal(batch["attention_mask"][row], segment_ids > 0)
  assert seen == 10 and not singles
  assert len(packed) < 5  # several examples share rows
  assert max(int(b["segment_ids"].max()) for b in packed) >= 3


def test_preference_records_batch_chosen_and_rejected_with_one_image(processor):
  prefs = SyntheticPreferences(SyntheticVQA(4, config=SyntheticConfig(image_size=56)))
  (batch,) = list(make_dataset(prefs, processor, batch_size=4, shuffle=False, shard_index=0, shard_count=1,
                               records="preference"))
  assert {"chosen_input_ids", "rejected_loss_mask", "pixel_values", "image_patch_index"} <= batch.keys()
  assert "input_ids" not in batch
  tok = processor.tokenizer
  assert _answers(batch, tok, "chosen_") == [prefs[i]["chosen"] for i in range(4)]
  assert _answers(batch, tok, "rejected_") == [prefs[i]["rejected"] for i in range(4)]
  np.testing.assert_array_equal(batch["chosen_input_ids"] < 0, batch["rejected_input_ids"] < 0)
  with pytest.raises(ValueError, match="preference .*packing=False"):
    make_dataset(prefs, processor, batch_size=2, packing=True, shard_index=0, shard_count=1, records="preference")


def test_worker_processes_give_the_same_batches(processor):
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  records = SyntheticVQA(8, config=SyntheticConfig(image_size=56))
  kw = dict(batch_size=4, seed=5, shard_index=0, shard_count=1)
  reference = list(make_dataset(records, processor, num_threads=0, **kw))
  _assert_batches_equal(list(make_dataset(records, processor, num_threads=0, num_workers=2, **kw)), reference)
