"""Input pipeline: a prepared dataset -> sharded, shuffled, flipped batches, with grain.

Batches are dicts of numpy arrays, exactly what the trainer consumes:
  image     uint8 (B, S, S, 3) RGB
  att_a     float32 (B, 13) 0/1 labels in `labels.ATTRIBUTES` order
  att_b     float32 (B, 13) the rows of att_a permuted within the GLOBAL batch (AttGAN's target attributes)
  identity  int32 (B,), -1 when unknown

The sequence is `data.global_batches`: every host computes the same global batches (order, flips, att_b permutation,
all from `seed`, the epoch and the batch index) and reads only the records of its own slice of each, so the hosts'
batches, concatenated, are the one-host batch (and `data.sources.InMemorySource`'s, on the same records): the
data does not depend on the number of hosts. att_b rows that come from other hosts' records are read from a label-only
view of the dataset (images not decoded). A restored iterator state (`iterator.get_state()`, JSON bytes;
`iterator.set_state(state)`) continues the exact sequence.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image

from erasablemask_jax import image_io
from erasablemask_jax.align import pipeline as align_pipeline
from erasablemask_jax.data import builders
from erasablemask_jax.data import global_batches
from erasablemask_jax.data import labels as labels_lib


def open_source(source_or_builder_dir: Any, split: str = "train", labels_only: bool = False
                ) -> grain.RandomAccessDataSource:
  """A builder directory (from `builders.build`), or an existing random-access source of records -> a source.

  `labels_only`: a builder directory's records come with the PNG bytes undecoded (for reading `att` cheaply).
  """
  if isinstance(source_or_builder_dir, (str, pathlib.Path)):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(source_or_builder_dir)
    if not (path / "dataset_info.json").is_file():
      raise FileNotFoundError(f"{path} is not a prepared dataset directory (no dataset_info.json); prepare it with "
                              "`erasablemask_jax.data.builders.build(...)` and pass the directory it returns")
    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
      raise ValueError(f"{path} has no split {split!r}; it has {sorted(builder.info.splits)}")
    if labels_only:
      return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return builder.as_data_source(split=split)
  return source_or_builder_dir


class _Parse(grain.MapTransform):
  """Record -> {"image" uint8 (S, S, 3), "att_a" float32 (13,), "identity" int32}, resizing when S differs."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, record):
    image = np.asarray(record["image"], np.uint8)
    if image.shape[0] != self.image_size or image.shape[1] != self.image_size:
      image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size),
                                                      Image.Resampling.BILINEAR if image.shape[0] < self.image_size
                                                      else Image.Resampling.BOX))
    return {"image": image, "att_a": np.asarray(record["att"], np.float32),
            "identity": np.int32(record["identity"])}


class HostBatches(grain.RandomAccessDataSource):
  """Element `s`: this host's slice of global batch `s` of the `data.global_batches` sequence (epochs in a row),
  parsed, flipped, with att_b from the whole global batch.

  Args:
    source: the records (`{"image", "att", "identity"}`).
    labels: a source of the same records whose `att` is cheap to read (`open_source(..., labels_only=True)`); att_b
      rows of records on other hosts' slices come from it.
    global_batch_size: B, over all hosts.
    seed, shuffle, flip, drop_remainder: as `global_batches`.
    image_size: side of the delivered images.
    process_index, process_count: this host.
    num_epochs: None: endless.
  """

  def __init__(self, source, labels, *, global_batch_size: int, seed: int, shuffle: bool, flip: bool, image_size: int,
               process_index: int, process_count: int, num_epochs: int | None, drop_remainder: bool):
    global_batches.host_slice(global_batch_size, process_index, process_count)  # checks the index
    self._source, self._labels = source, labels
    self._n, self._batch = len(source), global_batch_size
    self._seed, self._shuffle, self._flip = seed, shuffle, flip
    self._host = (process_index, process_count)
    self._parse = _Parse(image_size)
    self.steps_per_epoch = global_batches.steps_per_epoch(self._n, global_batch_size, drop_remainder)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{self._n} examples cannot fill one global batch of {global_batch_size}; lower the batch size")
    self._len = sys.maxsize if num_epochs is None else self.steps_per_epoch * num_epochs
    self._desc = (f"HostBatches({source!r}, batch={global_batch_size}, seed={seed}, shuffle={shuffle}, flip={flip}, "
                  f"size={image_size}, host={process_index}/{process_count}, epochs={num_epochs}, "
                  f"drop_remainder={drop_remainder})")

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:  # grain records this in the iterator state; keep it stable
    return self._desc

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    epoch, position = divmod(int(step), self.steps_per_epoch)
    plan = global_batches.global_batch(self._n, self._batch, self._seed, epoch, position, shuffle=self._shuffle,
                                       flip=self._flip)
    local = global_batches.host_slice(len(plan.records), *self._host)
    rows = [self._parse.map(self._source[int(k)]) for k in plan.records[local]]
    if not rows:  # a short last batch with fewer rows than hosts
      return {}
    images = np.stack([r["image"] for r in rows])
    images = np.where(plan.flips[local, None, None, None], images[:, :, ::-1], images)
    att_b = np.stack([np.asarray(self._labels[int(k)]["att"], np.float32) for k in plan.records[plan.perm[local]]])
    return {"image": np.ascontiguousarray(images), "att_a": np.stack([r["att_a"] for r in rows]), "att_b": att_b,
            "identity": np.asarray([r["identity"] for r in rows], np.int32)}


class _NonEmpty(grain.FilterTransform):

  def filter(self, element) -> bool:
    return bool(element)


def make_train_iterator(source_or_builder_dir: Any, *, batch_size: int, seed: int, image_size: int,
                        shuffle: bool = True, flip: bool = True, process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, split: str = "train", drop_remainder: bool = True,
                        worker_count: int = 0, prefetch: int = 64):
  """A resumable iterator of this host's slices of the global training batches (module docstring).

  Args:
    source_or_builder_dir: a prepared builder directory, or a random-access source of `{"image", "att",
      "identity"}` records (small in-memory sets train through `data.sources.InMemorySource`).
    batch_size: examples per batch on this host; the global batch is `batch_size * process_count`.
    seed: seeds the shuffle, flips and att_b permutations.
    image_size: side S of the delivered images (resized if the stored size differs).
    shuffle: reshuffle every epoch (all records, the same order on every host).
    flip: random horizontal flips.
    process_index, process_count: this host (`jax.process_index()/process_count()`).
    num_epochs: None repeats forever.
    split: which split of a builder directory.
    drop_remainder: drop each epoch's trailing partial global batch (every host then runs the same number of full
      steps). Set False to see every example exactly once (the last batches are then shorter, or absent on a host
      whose slice of the last global batch is empty).
    worker_count: grain worker processes (0 reads in this process with reader threads).
    prefetch: records read ahead (in whole host batches) by the reader threads.

  Returns:
    A grain `DataLoader` iterator: `next(it)` gives a batch dict; `it.get_state()` / `it.set_state(state)` save and
    restore the position (bytes, JSON inside).
  """
  source = open_source(source_or_builder_dir, split)
  if len(source) == 0:
    raise ValueError(f"{source_or_builder_dir} ({split}) holds no examples")
  labels = open_source(source_or_builder_dir, split, labels_only=True) if isinstance(
      source_or_builder_dir, (str, pathlib.Path)) else source
  batches = HostBatches(source, labels, global_batch_size=batch_size * process_count, seed=seed, shuffle=shuffle,
                        flip=flip, image_size=image_size, process_index=process_index, process_count=process_count,
                        num_epochs=num_epochs, drop_remainder=drop_remainder)
  ahead = max(2, -(-prefetch // batch_size))
  loader = grain.DataLoader(
      data_source=batches, sampler=grain.SequentialSampler(len(batches), shard_options=grain.NoSharding()),
      operations=[] if drop_remainder else [_NonEmpty()], worker_count=worker_count,
      read_options=grain.ReadOptions(num_threads=min(16, ahead), prefetch_buffer_size=ahead))
  return iter(loader)


def make_eval_iterator(source_or_builder_dir: Any, *, batch_size: int, image_size: int, split: str = "test",
                       process_index: int = 0, process_count: int = 1):
  """Every example once over the hosts (each host its slice of every global batch), in record order, no flips; the
  last batches may be smaller."""
  return make_train_iterator(source_or_builder_dir, batch_size=batch_size, seed=0, image_size=image_size,
                             shuffle=False, flip=False, process_index=process_index, process_count=process_count,
                             num_epochs=1, split=split, drop_remainder=False)


def load_face_folder_arrays(folder: str | pathlib.Path, size: int, align: bool = False) -> dict[str, Any]:
  """Reads a small face folder (same layout as the `face_folder` builder) straight into memory.

  Args:
    folder: images (recursive) and an optional `attributes.csv`; `bundled:sample_faces` names the bundled sample.
    size: output side; images are centre-cropped and resized (or MTCNN-aligned with `align`, loose template).
    align: detect and align each photo (photos without a face are skipped).

  Returns:
    `{"image": uint8 (N, size, size, 3), "att": float32 (N, 13), "identity": int32 (N,), "file": list[str],
      "report": ImportReport}`, sorted by file.
  """
  folder = builders.resolve_manual_dir(folder)
  csv_path = folder / builders.ATTRIBUTES_CSV
  rows = labels_lib.read_attribute_csv(csv_path, require_attributes=False) if csv_path.is_file() else {}
  report = image_io.ImportReport()
  out = {"image": [], "att": [], "identity": [], "file": []}
  for path in image_io.list_images(folder):
    rel = str(path.relative_to(folder))
    report.read += 1
    try:
      image = image_io.read_image(path, rel, report)
      if align:
        result = align_pipeline.align_image(image, size, "loose")
        if result is None:
          raise image_io.SkipImage("no face: MTCNN found no face")
        image = result.crop
      else:
        image = image_io.square_resize(image, size)
    except image_io.SkipImage as e:
      report.skip(rel, str(e))
      continue
    att, identity = rows.get(rel, (np.zeros(labels_lib.NUM_ATTRIBUTES, np.float32), -1))
    out["image"].append(image)
    out["att"].append(att)
    out["identity"].append(identity)
    out["file"].append(rel)
    report.written += 1
  if not out["image"]:
    raise FileNotFoundError(f"no usable images under {folder} ({report.summary()})")
  return {"image": np.stack(out["image"]), "att": np.stack(out["att"]).astype(np.float32),
          "identity": np.asarray(out["identity"], np.int32), "file": out["file"], "report": report}
