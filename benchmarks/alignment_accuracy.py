"""Alignment accuracy on the shared assets' full sets: landmark error vs the recorded `alignment_meta.json` files, faces
found, seconds per photo, and the foamliu MobileFaceNet verification AUC of our ArcFace crops vs the assets' crops.

Usage: `python benchmarks/alignment_accuracy.py [--assets ../shared/assets] [--crop continuous|facenet]
[--max-side 1000] [--downscale exact_area|adaptive_pool] [--out benchmarks/alignment_accuracy.json]`. Needs ../shared/assets (CelebA is read from there only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from erasablemask_jax import fr
from erasablemask_jax.align import detect
from erasablemask_jax.align import evaluate
from erasablemask_jax.fr import calibration

SETS = ("celeba_wild_identities", "deepface_pairs")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--assets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets"))
  ap.add_argument("--crop", default=detect.DetectorConfig.crop, choices=("continuous", "facenet"))
  ap.add_argument("--max-side", type=int, default=detect.DetectorConfig.max_side)
  ap.add_argument("--downscale", default=detect.DetectorConfig.downscale, choices=("exact_area", "adaptive_pool"))
  ap.add_argument("--limit", type=int, default=0, help="only the first N photos of each set (0: all)")
  ap.add_argument("--out", default="benchmarks/alignment_accuracy.json")
  args = ap.parse_args()
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
  auc = evaluate.compare_verification(recogniser, celeba,
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
  out = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
         "jax": jax.__version__, "numpy": np.__version__, "settings": vars(args),
         "detector": dataclasses.asdict(config), "landmarks": rows, "verification": auc, "per_photo_px": per_photo}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
