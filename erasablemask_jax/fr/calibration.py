"""Verification calibration: genuine / impostor cosine scores -> ROC, AUC, thresholds and TAR at fixed FAR.

Scores are cosines of L2-normalised embeddings. For impostor scores `s_imp` (n of them) and a target FAR `f`, the
threshold is the `(k+1)`-th highest impostor score with `k = floor(f * n)`, so that

    FAR(t) = #{s_imp > t} / n <= f,      TAR(t) = #{s_gen > t} / #genuine,

and a pair is accepted when `cos > t` (the ASR criterion of the SPEC). AUC is the Mann-Whitney statistic
`P(s_gen > s_imp) + 0.5 P(s_gen = s_imp)`.

Pairs come either from an identity file (CelebA `identity_CelebA_subset.txt` style: `<image> <identity>` per line,
entries match images by file stem) giving every same-identity pair as genuine and every other pair as impostor, or
from a pair list CSV (deepface `master.csv`: `file_x,file_y,Decision` with Yes/No; or any CSV with two file columns and
a `same_identity`/`label` column of 1/0).
"""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from erasablemask_jax.data import images as images_lib

FARS = (0.1, 0.01, 0.001)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class CalibrationError(ValueError):
  """Calibration inputs are missing, malformed, or match no images."""


def far_key(far: float) -> str:
  """`0.01` -> `"far_0.01"` (the key of card thresholds and result entries)."""
  return f"far_{far:g}"


def list_faces(folder: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
  """`{file stem: path}` of the images in `folder` (not recursive)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise CalibrationError(f"faces folder {folder} does not exist")
  faces = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
  if not faces:
    raise CalibrationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
  return faces


def is_pair_list(path: str | os.PathLike[str]) -> bool:
  """True when `path` looks like a CSV pair list (a comma-separated header with two file columns and a label)."""
  with open(path, newline="") as f:
    header = f.readline()
  return "," in header and len(header.split(",")) >= 3


def read_identities(path: str | os.PathLike[str]) -> dict[str, str]:
  """`{image stem: identity}` from lines `<image> <identity>` (a non-numeric header line is skipped)."""
  out: dict[str, str] = {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.replace(",", " ").split()
      if not parts:
        continue
      if len(parts) != 2:
        raise CalibrationError(f"{path}:{lineno}: expected '<image> <identity>', got {line.strip()!r}")
      if lineno == 1 and parts[0].lower() in ("image", "file", "filename", "image_id"):
        continue
      out[pathlib.Path(parts[0]).stem] = parts[1]
  if not out:
    raise CalibrationError(f"{path}: no '<image> <identity>' lines")
  return out


def read_pair_list(path: str | os.PathLike[str]) -> list[tuple[str, str, bool]]:
  """`[(stem_a, stem_b, same)]` from a CSV pair list (deepface `master.csv`, LFW-style `pairs.csv`)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise CalibrationError(f"{path}: empty pair list")
  cols = list(rows[0])
  file_cols = [c for c in cols if c.lower() in ("file_x", "file_y", "file0", "file1", "img1", "img2", "image1",
                                                  "image2", "a", "b")]
  label_cols = [c for c in cols if c.lower() in ("decision", "same_identity", "label", "same", "is_same")]
  if len(file_cols) != 2 or len(label_cols) != 1:
    raise CalibrationError(f"{path}: a pair list needs two file columns (e.g. file_x,file_y) and one label column "
                           f"(Decision Yes/No or same_identity 1/0); got columns {cols}")
  out = []
  for row in rows:
    label = row[label_cols[0]].strip().lower()
    if label not in ("yes", "no", "1", "0", "true", "false"):
      raise CalibrationError(f"{path}: label {row[label_cols[0]]!r} is not Yes/No or 1/0")
    out.append((pathlib.Path(row[file_cols[0]]).stem, pathlib.Path(row[file_cols[1]]).stem,
                label in ("yes", "1", "true")))
  return out


def pairs_from_identities(stems: Sequence[str], identities: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
  """All unordered pairs `(i, j)`, `i < j`, split into genuine (same identity) and impostor index arrays."""
  ids = np.asarray([identities[s] for s in stems])
  i, j = np.triu_indices(len(stems), k=1)
  same = ids[i] == ids[j]
  return np.stack([i[same], j[same]], 1), np.stack([i[~same], j[~same]], 1)


def auc_score(genuine: np.ndarray, impostor: np.ndarray) -> float:
  """Mann-Whitney AUC `P(g > i) + 0.5 P(g = i)` via average ranks."""
  from scipy.stats import rankdata  # pylint: disable=g-import-not-at-top
  scores = np.concatenate([genuine, impostor])
  ranks = rankdata(scores)
  n_g, n_i = len(genuine), len(impostor)
  return float((ranks[:n_g].sum() - n_g * (n_g + 1) / 2) / (n_g * n_i))


def roc_metrics(genuine: np.ndarray, impostor: np.ndarray, fars: Iterable[float] = FARS,
                max_points: int = 400) -> dict[str, Any]:
  """AUC, thresholds and TAR at each FAR, and a (sub-sampled) ROC curve.

  Args:
    genuine: cosine scores of same-identity pairs.
    impostor: cosine scores of different-identity pairs.
    fars: false-accept rates at which to report thresholds and TARs.
    max_points: at most this many ROC points are kept (evenly spaced along the curve, end points included).

  Returns:
    `{"auc", "thresholds": {far_key: t}, "tar_at_far": {far_key: TAR}, "far_achieved": {far_key: FAR(t)},
    "roc": {"far": [...], "tar": [...], "threshold": [...]}, "n_genuine", "n_impostor", "mean_cos"}`.
  """
  genuine = np.asarray(genuine, np.float64)
  impostor = np.asarray(impostor, np.float64)
  if len(genuine) == 0 or len(impostor) == 0:
    raise CalibrationError(f"need genuine and impostor pairs, got {len(genuine)} genuine and {len(impostor)} "
                           "impostor; check that the identity file / pair list matches the images")
  imp_desc = np.sort(impostor)[::-1]
  thresholds, tars, achieved = {}, {}, {}
  for far in fars:
    k = int(np.floor(far * len(imp_desc)))
    t = float(imp_desc[min(k, len(imp_desc) - 1)])
    thresholds[far_key(far)] = t
    tars[far_key(far)] = float(np.mean(genuine > t))
    achieved[far_key(far)] = float(np.mean(impostor > t))
  # ROC: accept when score > t, t sweeping every distinct score from high to low.
  ts = np.unique(np.concatenate([genuine, impostor]))[::-1]
  g_sorted, i_sorted = np.sort(genuine), np.sort(impostor)
  tar_curve = 1.0 - np.searchsorted(g_sorted, ts, side="right") / len(genuine)
  far_curve = 1.0 - np.searchsorted(i_sorted, ts, side="right") / len(impostor)
  far_curve = np.concatenate([[0.0], far_curve, [1.0]])
  tar_curve = np.concatenate([[0.0], tar_curve, [1.0]])
  thr_curve = np.concatenate([[np.inf], ts, [-np.inf]])
  if len(far_curve) > max_points:
    keep = np.unique(np.linspace(0, len(far_curve) - 1, max_points).round().astype(int))
    far_curve, tar_curve, thr_curve = far_curve[keep], tar_curve[keep], thr_curve[keep]
  return {
      "auc": auc_score(genuine, impostor),
      "thresholds": thresholds,
      "tar_at_far": tars,
      "far_achieved": achieved,
      "n_genuine": int(len(genuine)),
      "n_impostor": int(len(impostor)),
      "mean_cos": {"genuine": float(genuine.mean()), "impostor": float(impostor.mean())},
      "roc": {"far": far_curve.tolist(), "tar": tar_curve.tolist(),
              "threshold": [float(t) if np.isfinite(t) else None for t in thr_curve]},
  }


def load_faces(paths: Sequence[pathlib.Path]) -> list[np.ndarray]:
  """uint8 RGB arrays of the images, read as every other command reads them.

  That is `data.images.read_image`: EXIF orientation applied, 16-bit scaled to 8 bit, alpha composited on white.
  """
  out = []
  for p in paths:
    try:
      out.append(images_lib.read_image(p, str(p), min_side=1))
    except images_lib.SkipImage as e:
      raise CalibrationError(f"cannot read image {p}: {e}") from e
  return out


def prepare_pairs(faces: str | os.PathLike[str], identities: str | os.PathLike[str] | None = None,
                  pairs: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """Matches an identity file or pair list to the images of `faces`.

  Returns:
    `{"paths": [image paths], "genuine": (G, 2) indices, "impostor": (I, 2) indices, "n_identities",
    "pair_source", "skipped_entries"}` (indices into `paths`).
  """
  if identities is not None and pairs is None and is_pair_list(identities):
    identities, pairs = None, identities
  if (identities is None) == (pairs is None):
    raise CalibrationError("give exactly one of an identity file or a pair list")
  face_paths = list_faces(faces)
  if identities is not None:
    ident = read_identities(identities)
    stems = [s for s in face_paths if s in ident]
    skipped = sorted(set(ident) - set(face_paths))
    if len(stems) < 2:
      raise CalibrationError(f"only {len(stems)} images in {faces} match entries of {identities} by file stem "
                             "(e.g. 000114.jpg in the identity file names 000114.png)")
    genuine_idx, impostor_idx = pairs_from_identities(stems, ident)
    n_identities = len({ident[s] for s in stems})
    source = str(identities)
  else:
    pair_list = read_pair_list(pairs)
    skipped = sorted({s for a, b, _ in pair_list for s in (a, b) if s not in face_paths})
    pair_list = [p for p in pair_list if p[0] in face_paths and p[1] in face_paths]
    stems = sorted({s for a, b, _ in pair_list for s in (a, b)})
    index = {s: i for i, s in enumerate(stems)}
    genuine_idx = np.asarray([(index[a], index[b]) for a, b, same in pair_list if same], np.int64).reshape(-1, 2)
    impostor_idx = np.asarray([(index[a], index[b]) for a, b, same in pair_list if not same], np.int64).reshape(-1, 2)
    n_identities = None
    source = str(pairs)
  return {"paths": [face_paths[s] for s in stems], "genuine": genuine_idx, "impostor": impostor_idx,
          "n_identities": n_identities, "pair_source": source, "skipped_entries": len(skipped)}


def metrics_from_embeddings(emb: np.ndarray, genuine_idx: np.ndarray, impostor_idx: np.ndarray,
                            fars: Iterable[float] = FARS) -> dict[str, Any]:
  """`roc_metrics` of the cosine scores `<emb_i, emb_j>` of the genuine and impostor index pairs."""
  emb = np.asarray(emb, np.float64)
  cos = lambda idx: np.sum(emb[idx[:, 0]] * emb[idx[:, 1]], axis=1)
  return roc_metrics(cos(genuine_idx), cos(impostor_idx), fars=fars)


def calibrate(recogniser: Any, faces: str | os.PathLike[str], identities: str | os.PathLike[str] | None = None,
              pairs: str | os.PathLike[str] | None = None, flip: bool = False, batch_size: int = 64,
              fars: Iterable[float] = FARS) -> dict[str, Any]:
  """Embeds the faces, scores genuine and impostor pairs, and returns `roc_metrics` plus what was used.

  Args:
    recogniser: an `erasablemask_jax.fr.Recogniser` (anything with `embed(images, flip=...)` and `card`).
    faces: folder of aligned face images.
    identities: identity file (`<image> <identity>` lines, matched by stem); every pair of matched images is used.
    pairs: CSV pair list instead of (or, when `identities` is a CSV, detected from) the identity file.
    flip: embed as `normalise(f(x) + f(mirror(x)))`.
    batch_size: images per embedding call.
    fars: FARs for thresholds.

  Returns:
    The `roc_metrics` dict with `fr`, `faces`, `flip`, `n_images`, `n_identities`, `pair_source` and
    `skipped_entries` (identity or pair entries without an image) added.
  """
  prepared = prepare_pairs(faces, identities, pairs)
  emb = recogniser.embed(load_faces(prepared["paths"]), flip=flip, batch_size=batch_size)
  result = metrics_from_embeddings(emb, prepared["genuine"], prepared["impostor"], fars=fars)
  card = getattr(recogniser, "card", {})
  result.update({
      "fr": {"arch": card.get("arch"), "directory": str(getattr(recogniser, "directory", "") or ""),
             "source_sha256": card.get("source", {}).get("sha256")},
      "faces": str(faces), "pair_source": prepared["pair_source"], "flip": bool(flip),
      "n_images": len(prepared["paths"]), "n_identities": prepared["n_identities"],
      "skipped_entries": prepared["skipped_entries"],
  })
  return result


def plot_roc(result: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None) -> None:
  """Writes the ROC (log-scale FAR) with the FAR thresholds marked, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  far = np.asarray(result["roc"]["far"])
  tar = np.asarray(result["roc"]["tar"])
  fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
  floor = 0.5 / max(result["n_impostor"], 1)
  ax.plot(np.maximum(far, floor), tar, lw=1.5, label=f"AUC {result['auc']:.4f}")
  for key, t in result["thresholds"].items():
    f = float(key.split("_", 1)[1])
    ax.scatter([f], [result["tar_at_far"][key]], s=14, zorder=3)
    ax.annotate(f"TAR {result['tar_at_far'][key]:.3f}\nthr {t:.3f}", (f, result["tar_at_far"][key]),
                fontsize=7, xytext=(4, -18), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlim(floor, 1.0)
  ax.set_ylim(0.0, 1.01)
  ax.set_xlabel("false accept rate")
  ax.set_ylabel("true accept rate")
  ax.set_title(title or f"{result.get('fr', {}).get('arch')} {'(flip)' if result.get('flip') else ''}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def store_thresholds(model_dir: str | os.PathLike[str], result: Mapping[str, Any]) -> dict[str, Any]:
  """Writes `result`'s thresholds into the model directory's `card.json` (what evaluation reads); returns the card."""
  from erasablemask_jax import convert  # pylint: disable=g-import-not-at-top
  card = convert.read_card(model_dir)
  card["thresholds"] = dict(result["thresholds"])
  card["calibration"] = {k: result[k] for k in ("auc", "tar_at_far", "n_genuine", "n_impostor", "faces",
                                                "pair_source", "flip", "n_images") if k in result}
  convert.write_card(model_dir, card)
  return card
