"""The one global batch sequence every host agrees on: which records, which flips, which att_b permutation.

For N records, global batch size B and a seed, epoch e visits the records in

    order_e = permutation(default_rng([seed, e]), N)          (0..N-1 in order without shuffling)

global batch k of epoch e holds `order_e[kB:(k+1)B]` (a trailing partial batch is dropped, or kept short), and with
`rng = default_rng([seed, e, k])` its flips are `rng.random(B) < 1/2` (drawn only when flipping) and its target
attributes are `att_b = att_a[rng.permutation(B)]`, a permutation of the whole global batch (AttGAN's
`att_b = att_a[randperm]`). Host h of c serves rows `[h B // c, (h + 1) B // c)` of every global batch, so the hosts'
slices, concatenated, are the one-host batch: what a run trains on does not depend on the number of hosts.

Both input paths use it: `data.sources.InMemorySource` (small folders) and `data.pipeline.make_train_iterator`
(prepared datasets through grain).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
  """Global batch `position` of `epoch`.

  Attributes:
    records: `(B,)` record indices, in batch order.
    flips: `(B,)` bool, mirror the image.
    perm: `(B,)` the att_b permutation: `att_b = att_a[perm]` over the whole global batch.
  """

  records: np.ndarray
  flips: np.ndarray
  perm: np.ndarray


def steps_per_epoch(num_records: int, global_batch_size: int, drop_remainder: bool = True) -> int:
  """Global batches per epoch: `N // B`, or `ceil(N / B)` keeping the trailing partial batch."""
  if drop_remainder:
    return num_records // global_batch_size
  return -(-num_records // global_batch_size)


def global_batch(num_records: int, global_batch_size: int, seed: int, epoch: int, position: int, *,
                 shuffle: bool = True, flip: bool = True) -> GlobalBatch:
  """Global batch `position` of `epoch` (module docstring); the last batch of an epoch may be short."""
  order = np.random.default_rng([seed, epoch]).permutation(num_records) if shuffle else np.arange(num_records)
  records = order[position * global_batch_size:(position + 1) * global_batch_size]
  rng = np.random.default_rng([seed, epoch, position])
  n = len(records)
  flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
  return GlobalBatch(records=records, flips=flips, perm=rng.permutation(n))


def host_slice(size: int, process_index: int, process_count: int) -> slice:
  """Host `process_index` of `process_count`'s rows `[i size // c, (i + 1) size // c)` of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  return slice(process_index * size // process_count, (process_index + 1) * size // process_count)
