"""One global batch sequence whatever the host count: simulated hosts (process_index / process_count) of the grain
pipeline and of InMemorySource, whose slices concatenated are the one-host batch, att_b permuting the global batch."""

from __future__ import annotations

import numpy as np
import pytest

from data_records import Records
from erasablemask_jax.data import builders
from erasablemask_jax.data import global_batches
from erasablemask_jax.data import labels
from erasablemask_jax.data import pipeline
from erasablemask_jax.data import sources
from erasablemask_jax.data.sources import InMemorySource

N, S, B = 23, 8, 6  # 3 global batches per epoch, 5 records left over


def _arrays(n=N):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (n, S, S, 3)).astype(np.uint8)
  image[:, 1, 0, 1] = 255  # left-only marker shows flips
  image[:, 1, -1, 1] = 0
  return {"image": image, "att": rng.integers(0, 2, (n, labels.NUM_ATTRIBUTES)).astype(np.float32),
          "identity": np.arange(n, dtype=np.int32)}


def _hosts(make, count, steps):
  """`steps` batches of each of `count` simulated hosts, concatenated host by host per step."""
  its = [make(index, count) for index in range(count)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out


def _grain(arrays, seed=4):
  return lambda index, count: pipeline.make_train_iterator(Records(arrays), batch_size=B // count, seed=seed,
                                                           image_size=S, process_index=index, process_count=count)


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("count", [2, 3])
def test_grain_hosts_together_serve_the_one_host_batches(count):
  arrays = _arrays()
  steps = 7  # over two epoch boundaries
  one = _hosts(_grain(arrays), 1, steps)
  _assert_same(_hosts(_grain(arrays), count, steps), one)
  for batch in one:
    # att_b is a permutation of the whole global batch's att_a, not of a host's slice.
    assert sorted(map(tuple, batch["att_b"])) == sorted(map(tuple, batch["att_a"]))
    np.testing.assert_array_equal(batch["att_a"], arrays["att"][batch["identity"]])


def test_att_b_crosses_host_slices():
  """With two hosts, some att_b rows of host 0 are att_a rows of host 1's records (impossible when permuting within a
  host), and the rule is `att_b = att_a[perm]` of the global batch."""
  arrays = _arrays()
  crossed = False
  for step, batch in enumerate(_hosts(_grain(arrays), 2, 6)):
    epoch, position = divmod(step, N // B)
    plan = global_batches.global_batch(N, B, 4, epoch, position)
    np.testing.assert_array_equal(batch["identity"], plan.records)
    np.testing.assert_array_equal(batch["att_b"], arrays["att"][plan.records[plan.perm]])
    crossed |= bool((plan.perm[:B // 2] >= B // 2).any())
  assert crossed


def test_grain_and_in_memory_sources_serve_the_same_sequence():
  arrays = _arrays()
  for count in (1, 2):
    def in_memory(index, count):
      return InMemorySource(images=arrays["image"], attributes=arrays["att"], identity=arrays["identity"],
                            global_batch_size=B, seed=4, process_index=index, process_count=count)

    _assert_same(_hosts(_grain(arrays), count, 5), _hosts(in_memory, count, 5))


def test_eval_iterator_hosts_cover_every_example_once_in_order():
  arrays = _arrays()
  seen = []
  for index in range(3):
    it = pipeline.make_eval_iterator(Records(arrays), batch_size=2, image_size=S, split="train", process_index=index,
                                     process_count=3)
    batches = list(it)
    assert all(len(b["identity"]) > 0 for b in batches)
    seen.append([i for b in batches for i in b["identity"].tolist()])
  assert sorted(sum(seen, [])) == list(range(N))
  assert all(s == sorted(s) for s in seen)


def test_grain_source_of_a_prepared_builder_across_hosts(tmp_path):
  """The trainer's GrainSource on a real tfds builder directory: att_b rows of other hosts' records come from the
  label-only view (PNG bytes left undecoded) and the hosts' batches concatenate to the one-host batches."""
  d = builders.build("face_folder", "bundled:sample_faces", tmp_path, image_size=16)
  labels_only = pipeline.open_source(d, "train", labels_only=True)
  full = pipeline.open_source(d, "train")
  assert isinstance(labels_only[0]["image"], bytes)
  np.testing.assert_array_equal(labels_only[3]["att"], full[3]["att"])

  class Data:
    data_dir, batch_size, shuffle_seed, flip, worker_count = str(d), 8, 2, True, 0

  def make(index, count):
    return sources.GrainSource(Data, 16, index, count)

  one = _hosts(make, 1, 4)  # 28 faces: 3 steps per epoch, so across an epoch boundary
  _assert_same(_hosts(make, 2, 4), one)
  assert make(1, 2).steps_per_epoch == make(0, 1).steps_per_epoch == 28 // 8
  for batch in one:
    assert sorted(map(tuple, batch["att_b"])) == sorted(map(tuple, batch["att_a"]))


def test_too_few_examples_for_one_global_batch():
  with pytest.raises(ValueError, match="cannot fill one global batch"):
    pipeline.make_train_iterator(Records(_arrays(5)), batch_size=3, seed=0, image_size=S, process_count=2)
