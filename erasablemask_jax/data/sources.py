"""The trainer's data: host-local slices of one seeded global batch sequence, with a resumable position.

`make_source(config, ...)` picks one of two sources, which serve the same sequence: `InMemorySource` for small sets
that fit in host memory (the bundled sample, the shared test faces, a user's folder: `data.faces`), `GrainSource` for a
prepared tfds builder (large data, read with grain by `data.pipeline`).

`InMemorySource`: every host computes the same global batch sequence (`data.global_batches`: the order
`permutation(seed, epoch)`, flips and `att_b`, a permutation of `att_a` within the global batch, AttGAN's scheme, drawn
from `(seed, epoch, batch index)`) and takes its own contiguous slice of each global batch, so a run's global batches
are the same on 1 host or many, and on 1 device or many. Its state is two integers; the trainer checkpoints it beside the train state so a
resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from erasablemask_jax.data import global_batches
from erasablemask_jax.data import pipeline
from erasablemask_jax.data.faces import load_face_splits


@dataclasses.dataclass
class InMemorySource:
  """An endless, resumable iterator of host-local batches `{"image" uint8, "att_a", "att_b", "identity"}`.

  Args:
    images: `(N, H, W, 3)` uint8 RGB.
    attributes: `(N, A)` 0/1 labels.
    global_batch_size: examples per step over all hosts; a trailing partial batch of an epoch is dropped.
    seed: order, flips and att_b permutations derive from it.
    flip: random horizontal flips.
    process_index, process_count: this host's slice of every global batch.
    identity: `(N,)` int labels (-1 unknown).
  """

  images: np.ndarray
  attributes: np.ndarray
  global_batch_size: int
  seed: int = 0
  flip: bool = True
  process_index: int = 0
  process_count: int = 1
  identity: np.ndarray | None = None
  epoch: int = 0
  position: int = 0  # global batches already served in `epoch`

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, 3); got {self.images.dtype} {self.images.shape}")
    if len(self.attributes) != n:
      raise ValueError(f"{n} images but {len(self.attributes)} attribute rows")
    if self.global_batch_size % self.process_count:
      raise ValueError(f"global batch {self.global_batch_size} does not divide over {self.process_count} hosts; "
                       f"set data.batch_size to a multiple of {self.process_count}")
    if n < self.global_batch_size:
      raise ValueError(f"{n} examples cannot fill one global batch of {self.global_batch_size}; lower data.batch_size")
    if self.identity is None:
      self.identity = np.full((n,), -1, np.int32)

  @property
  def steps_per_epoch(self) -> int:
    return len(self.images) // self.global_batch_size

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position >= self.steps_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    plan = global_batches.global_batch(len(self.images), self.global_batch_size, self.seed, self.epoch,
                                       self.position, flip=self.flip)
    index = plan.records
    att_a = self.attributes[index].astype(np.float32)
    att_b = att_a[plan.perm]
    self.position += 1
    local = global_batches.host_slice(self.global_batch_size, self.process_index, self.process_count)
    images = self.images[index[local]]
    images = np.where(plan.flips[local, None, None, None], images[:, :, ::-1], images)
    return {"image": images, "att_a": att_a[local], "att_b": att_b[local],
            "identity": self.identity[index[local]].astype(np.int32)}


class GrainSource:
  """Adapts `erasablemask_jax.data.pipeline.make_train_iterator` (tfds builders, large data) to the trainer: this
  host's slice of each global batch, att_b permuted over the global batch, the same batches on any number of hosts."""

  def __init__(self, data_config, image_size: int, process_index: int, process_count: int):
    per_host = data_config.batch_size // process_count
    source = pipeline.open_source(data_config.data_dir, "train")
    self.steps_per_epoch = len(source) // process_count // per_host
    self._it = pipeline.make_train_iterator(
        data_config.data_dir, batch_size=per_host, seed=data_config.shuffle_seed, image_size=image_size,
        flip=data_config.flip, process_index=process_index, process_count=process_count,
        worker_count=data_config.worker_count)

  def __next__(self):
    return next(self._it)

  def get_state(self) -> dict[str, str]:
    state = self._it.get_state()
    return {"grain": state.decode() if isinstance(state, bytes) else state}

  def set_state(self, state: dict[str, str]) -> None:
    self._it.set_state(state["grain"].encode())


def make_source(config, process_index: int, process_count: int, train_arrays=None):
  """The training data of `config.data` as a host-local batch iterator.

  `data.data_dir` set: a prepared tfds builder read through grain (each host reads its slice of every global batch).
  Otherwise the in-memory folder `data.manual_dir` (split by `load_face_splits`). Both serve the `data.global_batches`
  sequence, so the global batches are independent of the number of hosts and devices.
  """
  if config.data.data_dir:
    return GrainSource(config.data, config.image_size, process_index, process_count)
  if train_arrays is None:
    train_arrays = load_face_splits(config.data, config.fr, config.image_size).train
  return InMemorySource(images=train_arrays["image"], attributes=train_arrays["att"],
                        identity=train_arrays["identity"], global_batch_size=config.data.batch_size,
                        seed=config.data.shuffle_seed, flip=config.data.flip, process_index=process_index,
                        process_count=process_count)
