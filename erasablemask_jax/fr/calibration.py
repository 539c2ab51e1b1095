"""Verification calibration: genuine / impostor cosine scores -> ROC, AUC, thresholds and TAR at fixed FAR.

Scores are cosines of L2-normalised embeddings. For impostor scores `s_imp` (n of them) and a target FAR `f`, the
threshold is the `(k+1)`-th highest impostor score with `k = floor(f * n)`, so that

    FAR(t) = #{s_imp > t} / n <= f,      TAR(t) = #{s_gen > t} / #genuine,

and a pair is accepted when `cos > t` (the ASR criterion of the SPEC). AUC is the Mann-Whitney statistic
`P(s_gen > s_imp) + 0.5 P(s_gen = s_imp)`.

Pairs come either from an identity file (CelebA `identity_CelebA_subset.txt` style: `<image> <identity>` per line,
entries match images by file stem) giving every same-identity pair as genuine and every other pair as impostor, or
from a pair list CSV (deepface `master.csv`: `file_x,file_y,Decision` with Yes/No; or any CSV with two file columns and
a `same_identity`/`label` column of 1/0), or from a face folder's `attributes.csv` (`file` and `identity` columns).

Thresholds belong to a view (`fr.views`): `view="arcface112"` embeds the faces as they are (ArcFace-aligned crops);
`view="loose_to_arcface@128"` or `"none@256"` reads them as training does (centre square resized to the size) and
embeds them through the run's crop and resize, so the thresholds match the scores training and evaluation compute.
`store_thresholds` files them under that view in the model card (`fr.thresholds`).
"""

from __future__ import annotations

import collections
import csv
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from erasablemask_jax import convert
from erasablemask_jax import image_io
from erasablemask_jax import run_dir
from erasablemask_jax.data import labels
from erasablemask_jax.fr import thresholds as thresholds_lib
from erasablemask_jax.fr import views
from erasablemask_jax.image_io import uint8_to_minus1_1

FARS = (0.1, 0.01, 0.001)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class CalibrationError(ValueError):
  """Calibration inputs are missing, malformed, or match no images."""


far_key = thresholds_lib.far_key


def list_faces(folder: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
  """`{file stem: path}` of the images in `folder` (not recursive)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise CalibrationError(f"faces folder {folder} does not exist")
  faces = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
  if not faces:
    raise CalibrationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
  return faces


def _csv_header(path: str | os.PathLike[str]) -> list[str]:
  with open(path, newline="") as f:
    header = f.readline()
  return [c.strip().lower() for c in header.split(",")] if "," in header else []


def is_pair_list(path: str | os.PathLike[str]) -> bool:
  """True when `path` looks like a CSV pair list (a comma-separated header with two file columns and a label)."""
  header = _csv_header(path)
  return len(header) >= 3 and not is_attribute_csv(path)


def is_attribute_csv(path: str | os.PathLike[str]) -> bool:
  """True when `path` is a CSV with `file` and `identity` columns (a face folder's `attributes.csv`)."""
  header = _csv_header(path)
  return "file" in header and "identity" in header


def read_identities(path: str | os.PathLike[str]) -> dict[str, str]:
  """`{image stem: identity}` from lines `<image> <identity>` (a non-numeric header line is skipped), or from the
  `file` and `identity` columns of an `attributes.csv` (rows with identity -1, unknown, are left out)."""
  if is_attribute_csv(path):
    try:
      rows = labels.read_attribute_csv(path, require_attributes=False)
    except labels.LabelFileError as e:
      raise CalibrationError(str(e)) from None
    out = {pathlib.Path(name).stem: str(identity) for name, (_, identity) in rows.items() if identity != -1}
    if not out:
      raise CalibrationError(f"{path}: no row with a known identity (all -1 or empty)")
    return out
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


def load_faces(paths: Sequence[pathlib.Path], image_size: int | None = None) -> list[np.ndarray]:
  """uint8 RGB arrays of the images, read as every other command reads them.

  That is `image_io.read_image`: EXIF orientation applied, 16-bit scaled to 8 bit, alpha composited on white; with
  `image_size`, the centre square resized to it (`image_io.square_resize`), as training reads a face folder.
  """
  out = []
  for p in paths:
    try:
      image = image_io.read_image(p, str(p), min_side=1)
    except image_io.SkipImage as e:
      raise CalibrationError(f"cannot read image {p}: {e}") from e
    out.append(image if image_size is None else image_io.square_resize(image, image_size))
  return out


_JITTED_VIEWS: collections.OrderedDict = collections.OrderedDict()  # (id(recogniser), crop) -> (recogniser, jitted)
_JITTED_VIEWS_KEPT = 8


def _jitted_view_apply(recogniser: Any, crop: str):
  """`jax.jit(views.view_apply(recogniser, crop))`, one per recogniser and crop: a study scores each model dozens of
  times, and a new closure per call would compile its network again every time. The few most recent are kept (each
  entry holds its recogniser, so an id is never reused while cached)."""
  key = (id(recogniser), crop)
  hit = _JITTED_VIEWS.get(key)
  if hit is not None and hit[0] is recogniser:
    _JITTED_VIEWS.move_to_end(key)
    return hit[1]
  apply = jax.jit(views.view_apply(recogniser, crop))
  _JITTED_VIEWS[key] = (recogniser, apply)
  while len(_JITTED_VIEWS) > _JITTED_VIEWS_KEPT:
    _JITTED_VIEWS.popitem(last=False)
  return apply


def embed_view(recogniser: Any, faces: Sequence[np.ndarray], view: str, flip: bool = False,
               batch_size: int = 64) -> np.ndarray:
  """Unit embeddings `(N, D)` of uint8 faces seen through `view` (`fr.views`).

  `arcface112`: `recogniser.embed(faces, flip=flip)`. A run's view `CROP@SIZE` (faces already SIZE x SIZE): the
  training surrogate's function, `views.view_apply(recogniser, CROP)`, jitted, on `x / 127.5 - 1`.
  """
  parsed = views.parse_view(view)
  if parsed is None:
    return recogniser.embed(faces, flip=flip, batch_size=batch_size)
  if flip:
    raise CalibrationError(f"--flip embeds normalise(f(x) + f(mirror(x))), which training and evaluation never "
                           f"compute; calibrate view {view} without it")
  crop, size = parsed
  images = np.stack(faces)
  if images.shape[1:3] != (size, size):
    raise CalibrationError(f"view {view} scores {size}x{size} faces; these are {images.shape[1]}x{images.shape[2]}")
  apply = _jitted_view_apply(recogniser, crop)
  batch_size = min(batch_size, len(images))
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:  # pad the last chunk: one compiled shape for every call
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(apply(recogniser.variables, uint8_to_minus1_1(chunk)))[:n])
  return np.concatenate(out)


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


def view_of_run(workdir: str | os.PathLike[str]) -> str:
  """The view a training run scores (`fr.input_crop@image_size`), from its `config.json`."""
  path = run_dir.config_path(workdir)
  try:
    config = run_dir.read_config_dict(workdir)
    return views.view_name(config["fr"]["input_crop"], config["image_size"])
  except run_dir.NotARunError as e:
    raise CalibrationError(str(e)) from None
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CalibrationError(f"{path} does not give the run's view (fr.input_crop and image_size): "
                           f"{type(e).__name__}: {e}") from None


def resolve_view(view: str | None = None, image_size: int | None = None,
                 run: str | os.PathLike[str] | None = None) -> str:
  """The view `calibrate` was asked for: `arcface112` (default), `CROP` with `image_size` (or `CROP@SIZE`), or a run's.

  Raises:
    CalibrationError: contradictory or incomplete arguments (the message says which to give).
  """
  if run is not None:
    if view is not None or image_size is not None:
      raise CalibrationError("--run takes the view from the run's config; drop --view / --image-size")
    return view_of_run(run)
  view = view or views.ARCFACE112
  if view == views.ARCFACE112:
    if image_size is not None:
      raise CalibrationError("--image-size applies to a run's view (--view none|loose_to_arcface), not arcface112, "
                             "whose faces are embedded as they are")
    return view
  if "@" in view:
    if image_size is not None:
      raise CalibrationError(f"--view {view} names its size already; drop --image-size")
  elif image_size is None:
    raise CalibrationError(f"--view {view} needs --image-size (the run's image_size), or give --run WORKDIR")
  else:
    view = f"{view}@{image_size}"
  try:
    views.parse_view(view)
  except ValueError as e:
    raise CalibrationError(str(e)) from None
  return view


def calibrate(recogniser: Any, faces: str | os.PathLike[str], identities: str | os.PathLike[str] | None = None,
              pairs: str | os.PathLike[str] | None = None, flip: bool = False, batch_size: int = 64,
              fars: Iterable[float] = FARS, view: str = views.ARCFACE112) -> dict[str, Any]:
  """Embeds the faces through `view`, scores genuine and impostor pairs, and returns `roc_metrics` plus what was used.

  Args:
    recogniser: an `erasablemask_jax.fr.Recogniser` (anything with `embed(images, flip=...)`, `card`, and for a run's
      view `apply_fn`, `variables` and `input_size`).
    faces: folder of face images: ArcFace-aligned crops for `arcface112`, the run's kind of crop (loose crops of our
      aligner for `loose_to_arcface@S`) otherwise.
    identities: identity file (`<image> <identity>` lines, or an `attributes.csv`, matched by stem); every pair of
      matched images is used.
    pairs: CSV pair list instead of (or, when `identities` is a CSV pair list, detected from) the identity file.
    flip: embed as `normalise(f(x) + f(mirror(x)))` (arcface112 only).
    batch_size: images per embedding call.
    fars: FARs for thresholds.
    view: `"arcface112"` or a run's `"CROP@SIZE"` (`fr.views`); the thresholds are that view's.

  Returns:
    The `roc_metrics` dict with `fr`, `faces`, `view`, `flip`, `n_images`, `n_identities`, `pair_source` and
    `skipped_entries` (identity or pair entries without an image) added.
  """
  parsed = views.parse_view(view)
  prepared = prepare_pairs(faces, identities, pairs)
  images = load_faces(prepared["paths"], image_size=None if parsed is None else parsed[1])
  emb = embed_view(recogniser, images, view, flip=flip, batch_size=batch_size)
  result = metrics_from_embeddings(emb, prepared["genuine"], prepared["impostor"], fars=fars)
  card = getattr(recogniser, "card", {})
  result.update({
      "fr": {"arch": card.get("arch"), "directory": str(getattr(recogniser, "directory", "") or ""),
             "source_sha256": card.get("source", {}).get("sha256")},
      "faces": str(faces), "view": view, "pair_source": prepared["pair_source"], "flip": bool(flip),
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
  """Writes `result`'s thresholds into the model directory's `card.json` under `result["view"]` (default
  arcface112), where training's and evaluation's reports look them up (`fr.thresholds`); returns the card."""
  view = result.get("view", views.ARCFACE112)
  info = {k: result[k] for k in ("auc", "tar_at_far", "n_genuine", "n_impostor", "faces", "pair_source", "flip",
                                 "n_images") if k in result}
  card = thresholds_lib.store(convert.read_card(model_dir), view, result["thresholds"], info)
  convert.write_card(model_dir, card)
  return card
