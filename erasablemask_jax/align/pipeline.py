"""Aligning photos: detect (MTCNN), choose one face, warp to a template; and doing that for a whole folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np
from PIL import Image

from erasablemask_jax.align import detect
from erasablemask_jax.align import warp
from erasablemask_jax import image_io

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AlignResult:
  """One aligned face: the crop and what the detector reported (original-image pixels)."""

  crop: np.ndarray
  box: np.ndarray
  score: float
  landmarks: np.ndarray
  n_faces: int

  def meta(self) -> dict:
    return {"score": float(self.score), "box": [round(float(v), 2) for v in self.box],
            "landmarks5": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "n_faces": int(self.n_faces)}


def align_image(image: np.ndarray, size: int, template_name: str = "arcface",
                config: detect.DetectorConfig = detect.DetectorConfig(), min_score: float = 0.95,
                border: str | None = None) -> AlignResult | None:
  """Detects faces in uint8 RGB `image`, picks one (`detect.select_face`) and warps it to `template_name` at `size`.

  Returns None when no face is found.
  """
  det = detect.detect_faces(image, config)
  i = detect.select_face(det, image.shape[:2], min_score)
  if i is None:
    return None
  crop, _ = warp.align_face(image, det.landmarks[i], size, template_name, border)
  return AlignResult(crop, det.boxes[i], float(det.scores[i]), det.landmarks[i], len(det))


def align_folder(in_dir: str | pathlib.Path, out_dir: str | pathlib.Path, size: int = 256,
                 templates: tuple[str, ...] = ("loose", "arcface"), config: detect.DetectorConfig =
                 detect.DetectorConfig(), arcface_size: int = 112, force: bool = False) -> image_io.ImportReport:
  """Aligns every photo under `in_dir` and writes PNG crops plus `alignment_meta.json` into `out_dir`.

  Layout: `out_dir/<template>_<side>/<relative path>.png` for each template (the `loose` crop at `size`, the
  `arcface` crop at `arcface_size`), and `out_dir/alignment_meta.json` mapping each relative input path to its
  box, score, 5 landmarks and number of faces. Unreadable photos and photos without a face are skipped and counted.

  Raises:
    FileNotFoundError: no images under `in_dir`.
    FileExistsError: an output of this run exists and `force` is False; checked before anything is written.
  """
  in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
  if not in_dir.is_dir():
    raise FileNotFoundError(f"{in_dir} is not a folder of photos")
  files = image_io.list_images(in_dir)
  if not files:
    raise FileNotFoundError(f"no images under {in_dir} (looked for {', '.join(image_io.IMAGE_EXTENSIONS)})")
  sides = {name: arcface_size if name == "arcface" else size for name in templates}
  outputs = [out_dir / "alignment_meta.json", out_dir / "align_report.json"] + [
      out_dir / f"{name}_{side}" / path.relative_to(in_dir).with_suffix(".png")
      for name, side in sides.items() for path in files]
  existing = [p for p in outputs if p.exists()]
  if existing and not force:
    raise FileExistsError(f"{len(existing)} output file(s) exist in {out_dir} (first {existing[0]}); pass --force to "
                          "overwrite them or choose another output folder")
  report = image_io.ImportReport()
  meta = {}
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    files_iter = tqdm(files, desc="align", unit="img")
  except ImportError:
    files_iter = files
  for path in files_iter:
    rel = str(path.relative_to(in_dir))
    report.read += 1
    try:
      image = image_io.read_image(path, rel, report)
    except image_io.SkipImage as e:
      report.skip(rel, str(e))
      continue
    det = detect.detect_faces(image, config)
    i = detect.select_face(det, image.shape[:2])
    if i is None:
      report.skip(rel, "no face: MTCNN found no face")
      continue
    for name, side in sides.items():
      crop, _ = warp.align_face(image, det.landmarks[i], side, name)
      dst = out_dir / f"{name}_{side}" / pathlib.Path(rel).with_suffix(".png")
      dst.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(crop).save(dst)
    meta[rel] = AlignResult(None, det.boxes[i], float(det.scores[i]), det.landmarks[i], len(det)).meta()
    report.written += 1
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "alignment_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  (out_dir / "align_report.json").write_text(report.to_json())
  log.info("aligned %s", report.summary())
  return report
