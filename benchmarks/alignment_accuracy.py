"""Alignment accuracy on the shared assets' full sets: landmark error vs the recorded `alignment_meta.json` files, faces
found, seconds per photo, and the foamliu MobileFaceNet verification AUC of our ArcFace crops vs the assets' crops.

Usage: `python -m benchmarks.alignment_accuracy [--assets ../shared/assets] [--crop continuous|facenet]
[--max-side 1000] [--downscale exact_area|adaptive_pool] [--out benchmarks/results/alignment_accuracy.json]`.
Needs ../shared/assets (CelebA is read from there only).

Verification AUC: every unordered pair of images is genuine when both stems share an identity, impostor otherwise; the
score is the cosine of the L2-normalised embeddings; the AUC is `calibration.metrics_from_embeddings`'s (Mann-Whitney)
AUC. Our crops and the reference crops are scored on the same images and pairs (`compare_verification`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from benchmarks import results as results_lib
from erasablemask_jax import fr
from erasablemask_jax.align import detect
from erasablemask_jax.align import evaluate
from erasablemask_jax.fr import calibration

SETS = ("celeba_wild_identities", "deepface_pairs")


def verification_auc(recogniser: Any, crops: Sequence[np.ndarray], stems: Sequence[str],
                     identities: Mapping[str, str]) -> dict[str, Any]:
  """`calibration.metrics_from_embeddings` (AUC, TAR@FAR, ...) of all pairs of `crops` labelled by stem identity."""
  genuine, impostor = calibration.pairs_from_identities(list(stems), identities)
  emb = recogniser.embed(np.stack(crops), flip=False)
  return calibration.metrics_from_embeddings(emb, genuine, impostor)


def compare_verification(recogniser: Any, results: Sequence[evaluate.PhotoResult], reference_dir: str | os.PathLike[str],
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


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--assets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets"))
  ap.add_argument("--crop", default=detect.DetectorConfig.crop, choices=("continuous", "facenet"))
  ap.add_argument("--max-side", type=int, default=detect.DetectorConfig.max_side)
  ap.add_argument("--downscale", default=detect.DetectorConfig.downscale, choices=("exact_area", "adaptive_pool"))
  ap.add_argument("--limit", type=int, default=0, help="only the first N photos of each set (0: all)")
  ap.add_argument("--out", default=results_lib.out_path("alignment_accuracy.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  assets = pathlib.Path(args.assets)
  if not (assets / "images").is_dir():
    raise SystemExit(f"shared assets not found at {assets}; pass --assets DIR")
  config = dataclasses.replace(detect.DetectorConfig(), crop=args.crop, max_side=args.max_side,
                               downscale=args.downscale)
  rows, per_photo, results_by_set = [], {}, {}
  for name in SETS:
    meta = evaluate.read_meta(assets / "images/derived_aligned112" / name / "alignment_meta.json")
    names = sorted(meta)[:args.limit or None]
    t = time.perf_counter()
    results = evaluate.detect_photos(assets / "images" / name, names, config)
    seconds = time.perf_counter() - t
    rep = evaluate.landmark_errors(results, meta)
    big = [rep["per_photo"][r.name] for r in results if max(r.image_hw) > args.max_side > 0
           and rep["per_photo"][r.name] is not None]
    rows.append({"set": name, "photos": rep["n"], "found": rep["n_found"], "mean_px": rep["mean_px"],
                 "median_px": rep["median_px"], "max_px": rep["max_px"],
                 "mean_px_downscaled": float(np.mean(big)) if big else None, "n_downscaled": len(big),
                 "s_per_photo": seconds / len(results), "missing": rep["missing"]})
    per_photo[name] = rep["per_photo"]
    results_by_set[name] = results
  recogniser = fr.load_bundled("mobilefacenet")
  identities = calibration.read_identities(assets / "images/celeba_wild_identities/identity_CelebA_subset.txt")
  celeba = [r for r in results_by_set["celeba_wild_identities"] if pathlib.Path(r.name).stem in identities]
  auc = compare_verification(recogniser, celeba,
                                      assets / "images/derived_aligned112/celeba_wild_identities", identities)

  print(f"detector: {config}")
  print(f"{'set':<24} {'photos':>6} {'found':>5} {'mean px':>8} {'median':>7} {'max':>7} {'>max_side mean':>14} "
        f"{'s/photo':>8}")
  for r in rows:
    big = f"{r['mean_px_downscaled']:.2f} ({r['n_downscaled']})" if r["mean_px_downscaled"] is not None else "-"
    print(f"{r['set']:<24} {r['photos']:>6} {r['found']:>5} {r['mean_px']:>8.2f} {r['median_px']:>7.2f} "
          f"{r['max_px']:>7.2f} {big:>14} {r['s_per_photo']:>8.2f}")
  print(f"MobileFaceNet (foamliu) verification AUC on CelebA ({auc['n_images']} photos, {auc['n_identities']} ids, "
        f"{auc['n_genuine']} genuine / {auc['n_impostor']} impostor pairs): ours {auc['auc_ours']:.4f}, "
        f"assets' crops {auc['auc_reference']:.4f}, diff {auc['auc_diff']:+.4f}")
  body = {"versions": {"jax": jax.__version__, "numpy": np.__version__}, "settings": vars(args),
          "detector": dataclasses.asdict(config), "landmarks": rows, "verification": auc, "per_photo_px": per_photo}
  print(f"wrote {results_lib.write_report(args.out, 'alignment_accuracy', argv, body, load_start)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
