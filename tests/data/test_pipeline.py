"""grain pipeline: batch format, host sharding, determinism and resume."""

from __future__ import annotations

import numpy as np
import pytest

from data_records import Records
from erasablemask_jax.data import labels
from erasablemask_jax.data import pipeline

N, S = 23, 8


def _arrays(n=N):
  rng = np.random.default_rng(0)
  image = np.zeros((n, S, S, 3), np.uint8)
  image[:, 0, 0, 0] = np.arange(n)  # record id, readable after flips from the top row
  image[:, 0, -1, 0] = np.arange(n)
  image[:, 1, 0, 1] = 255  # left-only marker shows flips
  return {"image": image, "att": rng.integers(0, 2, (n, labels.NUM_ATTRIBUTES)).astype(np.float32),
          "identity": np.arange(n, dtype=np.int32)}


def _ids(batch):
  return batch["identity"].tolist()


def test_batch_format_and_att_b_is_a_permutation():
  arrays = _arrays()
  it = pipeline.make_train_iterator(Records(arrays), batch_size=4, seed=0, image_size=S)
  saw_flip = saw_noflip = False
  for _ in range(6):
    b = next(it)
    assert set(b) == {"image", "att_a", "att_b", "identity"}
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, S, S, 3)
    assert b["att_a"].dtype == np.float32 and b["att_a"].shape == (4, 13)
    assert b["identity"].dtype == np.int32
    np.testing.assert_array_equal(b["att_a"], arrays["att"][b["identity"]])
    assert sorted(map(tuple, b["att_b"])) == sorted(map(tuple, b["att_a"]))
    flipped = b["image"][:, 1, -1, 1] == 255
    saw_flip |= flipped.any()
    saw_noflip |= (~flipped).any()
  assert saw_flip and saw_noflip


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_host_shards_cover_every_example_once(count):
  seen = []
  for index in range(count):
    it = pipeline.make_eval_iterator(Records(_arrays()), batch_size=5, image_size=S, process_index=index,
                                     process_count=count)
    seen += [i for b in it for i in _ids(b)]
  assert sorted(seen) == list(range(N))


def test_training_shards_are_disjoint_and_equal():
  per_host = []
  for index in range(3):
    it = pipeline.make_train_iterator(Records(_arrays()), batch_size=1, seed=3, image_size=S, process_index=index,
                                      process_count=3, num_epochs=1)
    per_host.append([i for b in it for i in _ids(b)])
  assert len({len(p) for p in per_host}) == 1
  flat = sum(per_host, [])
  assert len(flat) == len(set(flat)) == 3 * (N // 3)


def test_same_seed_same_batches_and_epochs_reshuffle():
  a = pipeline.make_train_iterator(Records(_arrays()), batch_size=N, seed=5, image_size=S, drop_remainder=False)
  b = pipeline.make_train_iterator(Records(_arrays()), batch_size=N, seed=5, image_size=S, drop_remainder=False)
  ea, eb = next(a), next(b)
  for k in ea:
    np.testing.assert_array_equal(ea[k], eb[k])
  assert sorted(_ids(ea)) == list(range(N))
  assert _ids(next(a)) != _ids(ea)


def test_resumed_iterator_continues_the_sequence():
  it = pipeline.make_train_iterator(Records(_arrays()), batch_size=4, seed=11, image_size=S)
  for _ in range(7):  # cross an epoch boundary (23 // 4 = 5 batches per epoch)
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(6)]
  resumed = pipeline.make_train_iterator(Records(_arrays()), batch_size=4, seed=11, image_size=S)
  resumed.set_state(state)
  for w in want:
    g = next(resumed)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_resize_on_read():
  it = pipeline.make_eval_iterator(Records(_arrays()), batch_size=2, image_size=4, split="train")
  assert next(it)["image"].shape == (2, 4, 4, 3)
