"""Measuring the aligner against recorded alignments: landmark error, and face-verification AUC of its crops.

Used by `tests/align/test_accuracy.py` (on subsets) and `benchmarks/alignment_accuracy.py` (on full sets).

- Landmark error of one photo: `mean_k ||p_k - q_k||_2` over the five landmarks, our `p` (of the face `select_face`
  picks) against the recorded `q` of an `alignment_meta.json` (`{file name: {"landmarks5": [[x, y] x5], ...}}`), in
  original-image pixels.
- Verification AUC: every unordered pair of images is genuine when both stems share an identity, impostor otherwise;
  the score is the cosine of the L2-normalised embeddings; the AUC is `calibration.metrics_from_embeddings`'s
  (Mann-Whitney) AUC. Our crops and the reference crops are scored on the same images and pairs.
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


def verification_auc(recogniser: Any, crops: Sequence[np.ndarray], stems: Sequence[str],
                     identities: Mapping[str, str]) -> dict[str, Any]:
  """`calibration.metrics_from_embeddings` (AUC, TAR@FAR, ...) of all pairs of `crops` labelled by stem identity."""
  from erasablemask_jax.fr import calibration  # pylint: disable=g-import-not-at-top
  genuine, impostor = calibration.pairs_from_identities(list(stems), identities)
  emb = recogniser.embed(np.stack(crops), flip=False)
  return calibration.metrics_from_embeddings(emb, genuine, impostor)


def compare_verification(recogniser: Any, results: Sequence[PhotoResult], reference_dir: str | os.PathLike[str],
                         identities: Mapping[str, str]) -> dict[str, Any]:
  """AUC of our ArcFace crops vs the reference crops `reference_dir/<stem>.png` on the same photos and pairs.

  Photos where we found no face are left out of BOTH sides (and listed).
  """
  reference_dir = pathlib.Path(reference_dir)
  kept = [r for r in results if r.arcface_crop is not None]
  stems = [pathlib.Path(r.name).stem for r in kept]
  ref_crops = []
  for stem in stems:
    path = reference_dir / f"{stem}.png"
    if not path.is_file():
      raise FileNotFoundError(f"reference crop {path} is missing")
    with Image.open(path) as im:
      ref_crops.append(np.asarray(im.convert("RGB")))
  ours = verification_auc(recogniser, [r.arcface_crop for r in kept], stems, identities)
  ref = verification_auc(recogniser, ref_crops, stems, identities)
  return {"auc_ours": ours["auc"], "auc_reference": ref["auc"], "auc_diff": ours["auc"] - ref["auc"],
          "tar_at_far_ours": ours["tar_at_far"], "tar_at_far_reference": ref["tar_at_far"],
          "n_images": len(stems), "n_identities": len({identities[s] for s in stems}),
          "n_genuine": ours["n_genuine"], "n_impostor": ours["n_impostor"],
          "left_out": [r.name for r in results if r.arcface_crop is None]}
