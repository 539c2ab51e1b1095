"""TFDS builders for CelebA-HQ, FFHQ and any folder of face photos, prepared from a manual directory.

No TensorFlow is needed: examples carry PNG bytes we encode with PIL, the files are written as array_record and read
back with `tfds.data_source` (see `erasablemask_jax.data.pipeline`). Every example is
`{"image": uint8 (S, S, 3), "att": float32 (13,) 0/1 in labels.ATTRIBUTES order, "identity": int32 (-1 unknown),
"file": the source path relative to the manual directory}`.

Manual-directory layouts:

celeba_hq (CelebAMask-HQ release)
  MANUAL/CelebAMask-HQ-attribute-anno.txt      required: 40 attributes, +1/-1, rows `<idx>.jpg ...`
  MANUAL/CelebA-HQ-img/<idx>.jpg               the 30,000 images (any extension; `images/` also accepted)
  MANUAL/CelebA-HQ-to-CelebA-mapping.txt       optional, with MANUAL/identity_CelebA.txt: identity labels
  Splits by image index, as AttGAN: train = first 28000, validation = next 500, test = last 1500 (`split_sizes`).
  The release's images are roughly aligned (its own FFHQ-like crop); they are resized to S (Lanczos), or with
  `align=True` re-aligned by MTCNN to our `loose` template at S, as the paper's MTCNN crop (configs/celebahq_paper.py;
  a photo with no face found is skipped).

ffhq
  MANUAL/images/**/<name>.png                  the aligned FFHQ images (any folder name under MANUAL works)
  MANUAL/attributes.csv                        required (FFHQ has no labels): see `labels.read_attribute_csv`
  Splits by sorted file name: train = first 60000, test = the rest (`split_sizes`). Resized to S.

face_folder (your own photos, the bundled sample, the shared test assets)
  MANUAL/**/<photo>                            any images (recursive)
  MANUAL/attributes.csv                        optional: labels (missing -> zeros) and identities (missing -> -1);
                                               an optional `split` column (train/validation/test), default train
  With `align=True` faces are detected with MTCNN and warped to the `loose` template at S; photos with no face are
  skipped. Otherwise each photo is centre-cropped and resized.

`align` is a builder setting for all three (`build(..., align=True)`, builder config `s<S>_aligned`): the FR models
then see the ArcFace box of each crop with `fr.input_crop = "loose_to_arcface"`.

Odd files (corrupt, truncated, grayscale, RGBA, CMYK, 16-bit, EXIF-rotated, tiny, no face) are converted or skipped
(`images.read_image`); the counts are logged and written to `prepare_report.json` in the dataset directory.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from erasablemask_jax import image_io
from erasablemask_jax.align import pipeline as align_pipeline
from erasablemask_jax.data import labels as labels_lib

log = logging.getLogger(__name__)

PACKAGE_ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
CELEBA_HQ_ANNOTATIONS = "CelebAMask-HQ-attribute-anno.txt"
ATTRIBUTES_CSV = "attributes.csv"


def resolve_manual_dir(spec: str | pathlib.Path) -> pathlib.Path:
  """`bundled:NAME` -> the package's `assets/NAME`; anything else is a path. Raises if the directory is missing.

  An empty spec is refused rather than read as the current folder (which a config without data would then scan).
  """
  spec = str(spec)
  if not spec.strip():
    raise FileNotFoundError("no training data: data.manual_dir is empty (and data.data_dir too); set "
                            "--config.data.manual_dir=FOLDER (a folder of faces, or bundled:sample_faces) or "
                            "--config.data.data_dir=DIR (a prepared builder)")
  path = PACKAGE_ASSETS / spec.split(":", 1)[1] if spec.startswith("bundled:") else pathlib.Path(spec).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"face folder {path} does not exist (from {spec!r}); give a folder of face images "
                            "(training: --config.data.manual_dir=FOLDER; evaluate and calibrate: --data FOLDER) or "
                            "bundled:sample_faces")
  return path


@dataclasses.dataclass
class FaceConfig(tfds.core.BuilderConfig):
  """Builder settings: output side `image_size`, split sizes (celeba_hq, ffhq) and MTCNN alignment (any builder)."""

  image_size: int = 256
  split_sizes: tuple[int, ...] = ()
  align: bool = False


def make_config(image_size: int = 256, split_sizes: tuple[int, ...] = (), align: bool = False) -> FaceConfig:
  name = f"s{image_size}" + ("_aligned" if align else "") + ("_split" + "-".join(map(str, split_sizes))
                                                               if split_sizes else "")
  return FaceConfig(name=name, image_size=image_size, split_sizes=tuple(split_sizes), align=align)


class _FaceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared features, per-example reading and the report."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the layout in `erasablemask_jax.data.builders` (module docstring)."

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "att": tfds.features.Tensor(shape=(labels_lib.NUM_ATTRIBUTES,), dtype=np.float32),
            "identity": tfds.features.Scalar(dtype=np.int32),
            "file": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(attributes=list(labels_lib.ATTRIBUTES)),
        disable_shuffling=True,  # record i is the i-th example of the split (sorted index / file name)
    )

  @property
  def report(self) -> image_io.ImportReport:
    if not hasattr(self, "_report"):
      self._report = image_io.ImportReport()
    return self._report

  def _prepare_image(self, path: pathlib.Path, name: str) -> np.ndarray:
    size = self.builder_config.image_size
    image = image_io.read_image(path, name, self.report, min_side=min(24, size))
    if self.builder_config.align:
      result = align_pipeline.align_image(image, size=size, template_name="loose")
      if result is None:
        raise image_io.SkipImage("no face: MTCNN found no face")
      return result.crop
    return image_io.square_resize(image, size)

  def _examples(self, items) -> Iterator[tuple[str, dict]]:
    """`items`: (key, path, name, att, identity). Yields encoded examples, recording skips."""
    for key, path, name, att, identity in items:
      self.report.read += 1
      try:
        image = self._prepare_image(path, name)
      except image_io.SkipImage as e:
        self.report.skip(name, str(e))
        continue
      self.report.written += 1
      yield key, {"image": image_io.encode_png(image), "att": np.asarray(att, np.float32),
                  "identity": np.int32(identity), "file": name}

  def _download_and_prepare(self, dl_manager, download_config=None):  # pylint: disable=arguments-differ
    super()._download_and_prepare(dl_manager, download_config)
    log.info("%s prepared: %s", self.name, self.report.summary())
    out = pathlib.Path(self.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare_report.json").write_text(self.report.to_json())


class CelebaHq(_FaceBuilder, skip_registration=True):
  """CelebA-HQ at S x S with the 13 AttGAN attributes from CelebAMask-HQ; AttGAN's 28000/500/1500 index split."""

  name = "celeba_hq"
  BUILDER_CONFIGS = [make_config(256)]

  def _split_generators(self, dl_manager):
    manual = pathlib.Path(dl_manager.manual_dir)
    anno = labels_lib.read_celebamask_hq_annotations(manual / CELEBA_HQ_ANNOTATIONS)
    img_dir = next((manual / d for d in ("CelebA-HQ-img", "images") if (manual / d).is_dir()), None)
    if img_dir is None:
      raise FileNotFoundError(f"no image folder in {manual}: expected CelebA-HQ-img/ (or images/) with <idx>.jpg")
    files = {int(p.stem): p for p in image_io.list_images(img_dir) if p.stem.isdigit()}
    missing = sorted(set(anno) - set(files))
    if missing:
      raise FileNotFoundError(f"{len(missing)} annotated images missing from {img_dir}, e.g. {missing[:5]}")
    identities = _celeba_hq_identities(manual)
    sizes = self.builder_config.split_sizes or (28000, 500, 1500)
    if sum(sizes) != len(anno):
      raise ValueError(f"split sizes {sizes} add up to {sum(sizes)} but {CELEBA_HQ_ANNOTATIONS} lists {len(anno)} "
                       "images; pass split_sizes that match")
    order = sorted(anno)
    bounds = np.cumsum((0,) + tuple(sizes))
    splits = {}
    for split, lo, hi in zip(("train", "validation", "test"), bounds[:-1], bounds[1:]):
      idx = order[lo:hi]
      splits[split] = self._examples(
          (f"{i:05d}", files[i], str(files[i].relative_to(manual)), anno[i], identities.get(i, -1)) for i in idx)
    return splits

  def _generate_examples(self, **kwargs):
    raise NotImplementedError  # examples come from `_split_generators`


def _celeba_hq_identities(manual: pathlib.Path) -> dict[int, int]:
  mapping, ident = manual / "CelebA-HQ-to-CelebA-mapping.txt", manual / "identity_CelebA.txt"
  if not (mapping.is_file() and ident.is_file()):
    return {}
  by_file = dict(line.split()[:2] for line in ident.read_text().splitlines() if line.strip())
  out = {}
  for line in mapping.read_text().splitlines()[1:]:
    parts = line.split()
    if len(parts) >= 3 and parts[2] in by_file:
      out[int(parts[0])] = int(by_file[parts[2]])
  return out


class Ffhq(_FaceBuilder, skip_registration=True):
  """FFHQ at S x S; attributes (and optional identities) from the user's `attributes.csv`; 60000/rest split."""

  name = "ffhq"
  BUILDER_CONFIGS = [make_config(256)]

  def _split_generators(self, dl_manager):
    manual = pathlib.Path(dl_manager.manual_dir)
    rows = labels_lib.read_attribute_csv(manual / ATTRIBUTES_CSV)
    files = {str(p.relative_to(manual)): p for p in image_io.list_images(manual)}
    missing = sorted(set(rows) - set(files))
    if missing:
      raise FileNotFoundError(f"{len(missing)} files named in {manual / ATTRIBUTES_CSV} are not in {manual}, "
                              f"e.g. {missing[:5]}")
    order = sorted(rows)
    n_train = (self.builder_config.split_sizes or (60000,))[0]
    return {
        "train": self._examples((k, files[k], k, *rows[k]) for k in order[:n_train]),
        "test": self._examples((k, files[k], k, *rows[k]) for k in order[n_train:]),
    }

  def _generate_examples(self, **kwargs):
    raise NotImplementedError


class FaceFolder(_FaceBuilder, skip_registration=True):
  """Any folder of face photos, optional `attributes.csv` (labels, identities, split); optional MTCNN alignment."""

  name = "face_folder"
  BUILDER_CONFIGS = [make_config(256)]

  def _split_generators(self, dl_manager):
    manual = pathlib.Path(dl_manager.manual_dir)
    csv_path = manual / ATTRIBUTES_CSV
    rows = labels_lib.read_attribute_csv(csv_path, require_attributes=False) if csv_path.is_file() else {}
    split_of = labels_lib.read_split_column(csv_path) if csv_path.is_file() else {}
    files = {str(p.relative_to(manual)): p for p in image_io.list_images(manual)}
    missing = sorted(set(rows) - set(files))
    if missing:
      raise FileNotFoundError(f"{len(missing)} files named in {csv_path} are not in {manual}, e.g. {missing[:5]}")
    if not files:
      raise FileNotFoundError(f"no images ({', '.join(image_io.IMAGE_EXTENSIONS)}) under {manual}")
    by_split: dict[str, list] = {}
    for k in sorted(files):
      att, identity = rows.get(k, (np.zeros(labels_lib.NUM_ATTRIBUTES, np.float32), -1))
      by_split.setdefault(split_of.get(k, "train"), []).append((k, files[k], k, att, identity))
    return {split: self._examples(items) for split, items in by_split.items()}

  def _generate_examples(self, **kwargs):
    raise NotImplementedError


BUILDERS = {"celeba_hq": CelebaHq, "ffhq": Ffhq, "face_folder": FaceFolder}


def build(name: str, manual_dir: str | pathlib.Path, data_dir: str | pathlib.Path, *, image_size: int = 256,
          split_sizes: tuple[int, ...] = (), align: bool = False) -> pathlib.Path:
  """Prepares dataset `name` from `manual_dir` into `data_dir` as array_record; returns the builder directory.

  The builder directory (`data_dir/name/<config>/1.0.0`) is what `pipeline.make_train_iterator` reads. Building again
  with the same settings reuses the prepared files.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
  manual = resolve_manual_dir(manual_dir)
  config = make_config(image_size, split_sizes, align)
  known = {c.name for c in BUILDERS[name].BUILDER_CONFIGS}
  builder = BUILDERS[name](data_dir=str(data_dir), config=config.name if config.name in known else config,
                           file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual), download_mode=tfds.download.GenerateMode
                                                   .REUSE_DATASET_IF_EXISTS))
  return pathlib.Path(builder.data_dir)
