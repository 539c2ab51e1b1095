"""Measuring the aligner against recorded alignments: its detections and their landmark error.

Used by `tests/align/test_accuracy.py` (on subsets) and `benchmarks/alignment_accuracy.py` (on full sets; the
face-verification AUC of the crops, which needs a face-recognition model, is computed there).

- Landmark error of one photo: `mean_k ||p_k - q_k||_2` over the five landmarks, our `p` (of the face `select_face`
  picks) against the recorded `q` of an `alignment_meta.json` (`{file name: {"landmarks5": [[x, y] x5], ...}}`), in
  original-image pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from erasablemask_jax.align import detect
from erasablemask_jax.align import warp


@dataclasses.dataclass(frozen=True)
class PhotoResult:
  """Our detection on one photo. `landmarks` (5, 2) and `box` (4,) in original pixels; None when no face was found."""

  name: str
  image_hw: tuple[int, int]
  landmarks: np.ndarray | None
  box: np.ndarray | None
  score: float | None
  n_faces: int
  arcface_crop: np.ndarray | None
  seconds: float


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Parses an `alignment_meta.json`; a missing file raises naming it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"alignment record {path} does not exist; expected the shared assets' "
                            "images/derived_aligned112/<folder>/alignment_meta.json")
  return json.loads(path.read_text())


def detect_photos(image_dir: str | os.PathLike[str], names: Iterable[str],
                  config: detect.DetectorConfig = detect.DetectorConfig(), crop_size: int = 112) -> list[PhotoResult]:
  """Detects and aligns (ArcFace template at `crop_size`) each named photo of `image_dir`, as `align_image` does."""
  image_dir = pathlib.Path(image_dir)
  out = []
  for name in names:
    with Image.open(image_dir / name) as im:
      image = np.asarray(im.convert("RGB"))
    t = time.perf_counter()
    det = detect.detect_faces(image, config)
    i = detect.select_face(det, image.shape[:2])
    crop = None
    if i is not None:
      crop, _ = warp.align_face(image, det.landmarks[i], crop_size, "arcface")
    out.append(PhotoResult(
        name=name, image_hw=tuple(image.shape[:2]), landmarks=None if i is None else det.landmarks[i],
        box=None if i is None else det.boxes[i], score=None if i is None else float(det.scores[i]),
        n_faces=len(det), arcface_crop=crop, seconds=time.perf_counter() - t))
  return out


def landmark_errors(results: Sequence[PhotoResult], meta: Mapping[str, Any]) -> dict[str, Any]:
  """Per-photo and summary landmark errors of `results` against the recorded `meta`.

  Returns:
    `{"per_photo": {name: error px or None (no face)}, "mean_px", "median_px", "max_px", "n", "n_found",
    "missing": [names without a face where the record has one]}`.
  """
  per_photo: dict[str, float | None] = {}
  missing = []
  for r in results:
    if r.name not in meta:
      raise KeyError(f"{r.name} has no entry in the alignment record")
    if r.landmarks is None:
      per_photo[r.name] = None
      missing.append(r.name)
      continue
    ref = np.asarray(meta[r.name]["landmarks5"], np.float64)
    per_photo[r.name] = float(np.linalg.norm(r.landmarks - ref, axis=1).mean())
  errs = np.asarray([e for e in per_photo.values() if e is not None])
  return {"per_photo": per_photo, "n": len(results), "n_found": int(len(errs)), "missing": missing,
          "mean_px": float(errs.mean()) if len(errs) else float("nan"),
          "median_px": float(np.median(errs)) if len(errs) else float("nan"),
          "max_px": float(errs.max()) if len(errs) else float("nan")}


def subset_by_identity(identities: Mapping[str, str], n_identities: int, per_identity: int) -> list[str]:
  """A deterministic subset: the first `n_identities` identities (sorted) with at least `per_identity` images, and
  their first `per_identity` stems (sorted). Returns the stems, identity by identity."""
  by_id: dict[str, list[str]] = {}
  for stem, ident in identities.items():
    by_id.setdefault(ident, []).append(stem)
  chosen = [i for i in sorted(by_id) if len(by_id[i]) >= per_identity][:n_identities]
  return [s for i in chosen for s in sorted(by_id[i])[:per_identity]]
