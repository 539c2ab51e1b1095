"""The six real FR models of ../shared/assets: calibration per view, TF.js parity, time per embedding.

    python -m benchmarks.real_fr_models [--models faceres,mobileface_v3] [--store] [--parity-every 1]

For each model (`fr.real_models`, loaded as `shared:NAME`, converted once into the cache):

1. `arcface112`: the 296 aligned CelebA crops (`derived_aligned112/celeba_wild_identities`, 74 identities, 444 genuine /
   43216 impostor pairs) as they are (the model's own preprocessing upscales 112 to 224 for faceres: bilinear,
   half-pixel centres): AUC, TAR and thresholds at FAR 0.1 / 0.01 / 0.001, the figures MANIFEST.md quotes;
2. the transfer study's view (`loose_to_arcface@128`): the same photos aligned by our MTCNN to loose 128 crops
   (`benchmarks/study_scoring.prepare_faces`, cached in `--workdir`) and seen through the ArcFace box, the view whose
   thresholds the study uses;
3. seconds per embedding on the 296 crops at batch 32 (steady state, and the first pass with compilation), unfolded and
   with `fold_batchnorm` (the trainer's default);
4. TF.js models only: parity with the independent float64 numpy executor `benchmarks/tfjs_reference.py` on every
   `--parity-every`-th crop: fed the exact input our preprocessing produces (max |diff| of unit embeddings), and for the
   224 models also fed a PIL bilinear upscale of the uint8 crop, as MANIFEST.md's executor was (minimum cosine).

`--store` writes both views' thresholds into the cached model cards (not the bundled foamliu card, which has them).
Writes `--out` (benchmarks/results/real_fr_models.json), replacing the rows of the models it ran and keeping the others.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from benchmarks import results

REPO = pathlib.Path(__file__).resolve().parents[1]
FACES = "images/derived_aligned112/celeba_wild_identities"
IDENTITIES = "images/celeba_wild_identities/identity_CelebA_subset.txt"
STUDY_VIEW = "loose_to_arcface@128"
# MANIFEST.md section 1d / the MXNet and PyTorch sections: AUC, TAR@FAR1e-2, TAR@FAR1e-3 on the 296 crops, and
# whether its executor summed the embeddings of the crop and its mirror image (the PyTorch figures did).
MANIFEST = {"faceres": (0.9850, 0.876, 0.736, False), "faceres_deep": (0.9575, 0.682, 0.471, False),
            "mobileface_v3": (0.9196, 0.498, 0.315, False), "mobileface_v2": (0.9834, 0.914, 0.824, False),
            "foamliu": (0.9923, 0.953, 0.912, True), "xiaoccer": (0.9899, 0.950, 0.865, True)}


def _time_embed(recogniser, images: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
  t = time.perf_counter()
  recogniser.embed(images, batch_size=32)
  first = time.perf_counter() - t
  t = time.perf_counter()
  emb = recogniser.embed(images, batch_size=32)
  steady = time.perf_counter() - t
  return {"first_pass_s": first, "steady_s": steady, "ms_per_image": 1000 * steady / len(images)}, emb


def parity(name: str, recogniser, images: np.ndarray, emb: np.ndarray) -> dict:
  """Our unit embeddings against the numpy reference executor of the same graph."""
  from PIL import Image

  from benchmarks.tfjs_reference import GraphReference
  from erasablemask_jax.fr import real_models
  from erasablemask_jax.fr.preprocess import preprocess
  from erasablemask_jax.fr.preprocess import uint8_to_minus1_1

  ref = GraphReference(real_models.asset_path(name))
  out, graph = recogniser.card["tfjs"]["output"], recogniser.card["tfjs"]
  unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)
  exact, pil, t0 = [], [], time.perf_counter()
  for start in range(0, len(images), 8):
    batch = images[start:start + 8]
    x = np.asarray(preprocess(uint8_to_minus1_1(batch), recogniser.preprocessing), np.float64)
    exact.append(unit(ref.run(x, out, graph["input"])))
    if tuple(recogniser.input_size) != batch.shape[1:3]:
      h, w = recogniser.input_size
      up = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in batch]).astype(np.float64)
      prep = recogniser.preprocessing
      xp = (up / 255 - np.asarray(prep.mean)) / np.asarray(prep.std)
      pil.append(unit(ref.run(xp[..., ::-1] if prep.channel_order == "BGR" else xp, out, graph["input"])))
  exact = np.concatenate(exact)
  row = {"n_images": len(images), "max_abs_diff_same_input": float(np.abs(emb - exact).max()),
         "min_cos_same_input": float((emb * exact).sum(1).min()), "reference_s": time.perf_counter() - t0}
  if pil:
    pil = np.concatenate(pil)
    row.update({"min_cos_pil_upscale": float((emb * pil).sum(1).min()),
                "mean_cos_pil_upscale": float((emb * pil).sum(1).mean()),
                "max_abs_diff_pil_upscale": float(np.abs(emb - pil).max())})
  return row


def main(argv: list[str] | None = None) -> int:
  from erasablemask_jax import fr
  from erasablemask_jax.convert import write_card
  from erasablemask_jax.fr import calibration
  from erasablemask_jax.fr import real_models
  from erasablemask_jax.fr import thresholds as thresholds_lib

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(real_models.REAL_MODELS))
  p.add_argument("--workdir", default=str(REPO / "runs" / "transfer_study"), help="where the study's loose crops live")
  p.add_argument("--store", action="store_true", help="store both views' thresholds in the cached model cards")
  p.add_argument("--parity-every", type=int, default=1, help="check parity on every N-th crop (0: skip)")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_fr_models.json"))
  args = p.parse_args(argv)
  assets = real_models.ASSETS_DIR
  if not (assets / FACES).is_dir():
    print(f"error: {assets / FACES} not found; this benchmark needs ../shared/assets", file=sys.stderr)
    return 2
  load_start = os.getloadavg()
  prepared = calibration.prepare_pairs(assets / FACES, assets / IDENTITIES)
  images = np.stack(calibration.load_faces(prepared["paths"]))
  from benchmarks import study_scoring  # the study's own aligned faces, so the study view is the study's
  loose = study_scoring.prepare_faces(pathlib.Path(args.workdir), 128, 0)
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text())["models"] if out.is_file() else {}  # other models' rows are kept
  for name in args.models.split(","):
    directory = real_models.model_dir(f"shared:{name}")
    recogniser = fr.load(directory)
    row = {"spec": f"shared:{name}", "directory": str(directory), "arch": recogniser.card["arch"],
           "family": real_models.REAL_MODELS[name].family, "description": real_models.REAL_MODELS[name].description,
           "input_size": list(recogniser.input_size), "embedding_size": recogniser.embedding_size,
           "preprocessing": recogniser.card["preprocessing"], "views": {}}
    timing, emb = _time_embed(recogniser, images)
    folded_timing, folded_emb = _time_embed(recogniser.fold_batchnorm(), images)
    row["timing"] = {"unfolded": timing, "folded": folded_timing,
                     "folded_max_abs_diff": float(np.abs(folded_emb - emb).max())}
    metrics = calibration.metrics_from_embeddings(emb, prepared["genuine"], prepared["impostor"])
    row["views"]["arcface112"] = {k: metrics[k] for k in ("auc", "tar_at_far", "thresholds", "far_achieved")}
    study = calibration.calibrate(recogniser, loose, identities=loose / "attributes.csv", batch_size=32,
                                  view=STUDY_VIEW)
    row["views"][STUDY_VIEW] = {k: study[k] for k in ("auc", "tar_at_far", "thresholds", "far_achieved")}
    row["views"][STUDY_VIEW]["n_images"] = study["n_images"]
    ref = MANIFEST.get(name)
    if ref is not None:
      a = row["views"]["arcface112"]
      if ref[3]:  # the MANIFEST figure is a flip-sum one: compare like with like
        a = calibration.metrics_from_embeddings(recogniser.embed(images, flip=True, batch_size=32),
                                                prepared["genuine"], prepared["impostor"])
      row["manifest"] = {"auc": ref[0], "tar_far_0.01": ref[1], "tar_far_0.001": ref[2], "flip_sum": ref[3],
                         "auc_diff": a["auc"] - ref[0], "tar_0.01_diff": a["tar_at_far"]["far_0.01"] - ref[1],
                         "tar_0.001_diff": a["tar_at_far"]["far_0.001"] - ref[2]}
    if recogniser.card["arch"] == "tfjs" and args.parity_every:
      row["parity"] = parity(name, recogniser, images[::args.parity_every], emb[::args.parity_every])
    if args.store and real_models.REAL_MODELS[name].arch != "bundled":
      card = recogniser.card
      faces_note = {"arcface112": f"shared assets {FACES} (296 CelebA crops, 74 identities)",
                    STUDY_VIEW: "shared assets images/celeba_wild_identities aligned by our MTCNN to the loose "
                                "template at 128 (benchmarks/study_scoring.py prepare_faces), seen through the "
                                "ArcFace box"}
      for view in ("arcface112", STUDY_VIEW):
        v = row["views"][view]
        card = thresholds_lib.store(card, view, v["thresholds"], {
            "auc": v["auc"], "tar_at_far": v["tar_at_far"], "faces": faces_note[view], "flip": False,
            "n_images": 296, "n_genuine": int(len(prepared["genuine"])), "n_impostor": int(len(prepared["impostor"])),
            "pair_source": "celeba_wild_identities/identity_CelebA_subset.txt (all pairs)"})
      write_card(directory, card)
      row["stored"] = True
    rows[name] = row
    a, s = row["views"]["arcface112"], row["views"][STUDY_VIEW]
    print(f"{name:14s} arcface112 AUC {a['auc']:.4f} TAR@1e-2 {a['tar_at_far']['far_0.01']:.3f} "
          f"TAR@1e-3 {a['tar_at_far']['far_0.001']:.3f} | {STUDY_VIEW} AUC {s['auc']:.4f} "
          f"TAR@1e-2 {s['tar_at_far']['far_0.01']:.3f} (thr {s['thresholds']['far_0.01']:.3f}) "
          f"TAR@1e-3 {s['tar_at_far']['far_0.001']:.3f} | {timing['ms_per_image']:.1f} ms/img "
          f"({folded_timing['ms_per_image']:.1f} folded)"
          + (f" | parity {row['parity']}" if "parity" in row else ""), flush=True)
    results.write_report(args.out, "real_fr_models", argv, {"settings": vars(args), "models": rows}, load_start)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
