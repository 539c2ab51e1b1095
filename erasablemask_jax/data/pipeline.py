"""Input pipeline: a prepared dataset (or in-memory arrays) -> sharded, shuffled, flipped batches, with grain.

Batches are dicts of numpy arrays, exactly what the trainer consumes:
  image     uint8 (B, S, S, 3) RGB
  att_a     float32 (B, 13) 0/1 labels in `labels.ATTRIBUTES` order
  att_b     float32 (B, 13) the rows of att_a permuted within the batch (AttGAN's target attributes)
  identity  int32 (B,), -1 when unknown

Determinism: every random choice (shuffle order, flips, the att_b permutation) derives from `seed` and the record /
batch position, so the same seed gives the same batches and a restored iterator state (`iterator.get_state()`, JSON
bytes; `iterator.set_state(state)`) continues the exact sequence. Each host reads only its own contiguous shard of
the record indices (`process_index` of `process_count`), so across hosts every example is read once per epoch.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import grain.python as grain
import numpy as np
from PIL import Image

from erasablemask_jax.data import builders
from erasablemask_jax.data import images as images_lib
from erasablemask_jax.data import labels as labels_lib


class ArraySource(grain.RandomAccessDataSource):
  """A random-access source over in-memory arrays `{"image": (N, ...), "att": (N, 13), "identity": (N,)}`."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = {k: np.asarray(arrays[k]) for k in ("image", "att", "identity")}
    n = {len(v) for v in self._arrays.values()}
    if len(n) != 1:
      raise ValueError(f"arrays have different lengths: { {k: len(v) for k, v in self._arrays.items()} }")
    self._n = n.pop()

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}

  def __repr__(self) -> str:  # grain records this in the iterator state; keep it short and stable
    return f"ArraySource(n={self._n})"


class ShardSource(grain.RandomAccessDataSource):
  """Host `index` of `count`'s contiguous slice of `source`: records [floor(i N / c), floor((i + 1) N / c)).

  The slices partition the records (every record on exactly one host). With `equal=True` each slice is cut to
  N // c records so every host runs the same number of steps (at most c - 1 records are then unused).
  """

  def __init__(self, source, index: int, count: int, equal: bool):
    if not 0 <= index < count:
      raise ValueError(f"process_index {index} is not in [0, process_count={count})")
    n = len(source)
    self._source = source
    self._lo = index * n // count
    hi = (index + 1) * n // count
    self._n = min(hi - self._lo, n // count) if equal else hi - self._lo
    self._desc = f"ShardSource({source!r}, {index}/{count}, equal={equal})"

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[self._lo + index]

  def __repr__(self) -> str:
    return self._desc


def open_source(source_or_builder_dir: Any, split: str = "train") -> grain.RandomAccessDataSource:
  """A builder directory (from `builders.build`), arrays dict, or an existing random-access source -> a source."""
  if isinstance(source_or_builder_dir, (str, pathlib.Path)):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(source_or_builder_dir)
    if not (path / "dataset_info.json").is_file():
      raise FileNotFoundError(f"{path} is not a prepared dataset directory (no dataset_info.json); prepare it with "
                              "`erasablemask_jax.data.builders.build(...)` and pass the directory it returns")
    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
      raise ValueError(f"{path} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)
  if isinstance(source_or_builder_dir, Mapping):
    return ArraySource(source_or_builder_dir)
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


class _RandomFlip(grain.RandomMapTransform):
  """Horizontal flip with probability 1/2 (attributes are mirror-invariant)."""

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
    return element


class _PermuteAttributes(grain.RandomMapTransform):
  """att_b = att_a[perm] for a random permutation of the batch (AttGAN's `att_b = att_a[randperm]`)."""

  def random_map(self, batch, rng: np.random.Generator):
    return dict(batch, att_b=batch["att_a"][rng.permutation(len(batch["att_a"]))])


def make_train_iterator(source_or_builder_dir: Any, *, batch_size: int, seed: int, image_size: int,
                        shuffle: bool = True, flip: bool = True, process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, split: str = "train", drop_remainder: bool = True,
                        worker_count: int = 0, prefetch: int = 64):
  """A resumable iterator of training batches for this host.

  Args:
    source_or_builder_dir: a prepared builder directory, an arrays dict (`load_face_folder_arrays`), or a source.
    batch_size: examples per batch on this host (the global batch divided by `process_count`).
    seed: seeds the shuffle, flips and att_b permutations.
    image_size: side S of the delivered images (resized if the stored size differs).
    shuffle: reshuffle every epoch (within this host's shard).
    flip: random horizontal flips.
    process_index, process_count: this host's shard of the record indices (`jax.process_index()/process_count()`).
    num_epochs: None repeats forever.
    split: which split of a builder directory.
    drop_remainder: drop the last incomplete batch, and make shards equal by dropping up to `process_count - 1`
      records (every host then runs the same number of steps). Set False to see every example exactly once.
    worker_count: grain worker processes (0 reads in this process with `prefetch` threads).
    prefetch: records read ahead by the reader threads.

  Returns:
    A grain `DataLoader` iterator: `next(it)` gives a batch dict; `it.get_state()` / `it.set_state(state)` save and
    restore the position (bytes, JSON inside).
  """
  source = open_source(source_or_builder_dir, split)
  if len(source) == 0:
    raise ValueError(f"{source_or_builder_dir} ({split}) holds no examples")
  # Sharding is done on the source (exact contiguous partition) rather than by grain's ShardOptions, whose
  # drop_remainder=False split leaves records out in this grain version.
  source = ShardSource(source, process_index, process_count, equal=drop_remainder)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(), shuffle=shuffle,
                               num_epochs=num_epochs, seed=seed)
  ops: list = [_Parse(image_size)]
  if flip:
    ops.append(_RandomFlip())
  ops += [grain.Batch(batch_size, drop_remainder=drop_remainder), _PermuteAttributes()]
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=ops, worker_count=worker_count,
      read_options=grain.ReadOptions(num_threads=max(1, min(16, prefetch // 4)), prefetch_buffer_size=prefetch))
  return iter(loader)


def make_eval_iterator(source_or_builder_dir: Any, *, batch_size: int, image_size: int, split: str = "test",
                       process_index: int = 0, process_count: int = 1):
  """Every example of this host's shard once, in order, no flips; the last batch may be smaller."""
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
  report = images_lib.ImportReport()
  out = {"image": [], "att": [], "identity": [], "file": []}
  for path in images_lib.list_images(folder):
    rel = str(path.relative_to(folder))
    report.read += 1
    try:
      image = images_lib.read_image(path, rel, report)
      if align:
        from erasablemask_jax.align import pipeline as align_pipeline  # pylint: disable=g-import-not-at-top
        result = align_pipeline.align_image(image, size, "loose")
        if result is None:
          raise images_lib.SkipImage("no face: MTCNN found no face")
        image = result.crop
      else:
        image = images_lib.square_resize(image, size)
    except images_lib.SkipImage as e:
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
