"""`evaluate --photos DIR`: the end-to-end path on whole photos, as an outside FR pipeline meets them.

The photos are protected (`inference.photos.protect_photos`, into `OUT/protected/`) and restored (`erase_photos`,
into `OUT/restored/`), exactly as the commands do. Then, per photo:

- faces are found again by our detector (`inference.photos.DETECTOR`) in the original, the protected and the restored
  photo; a protected face is "found" when a detection overlaps its recorded box (IoU >= `MATCH_IOU`), else it is
  lost and listed. Where OpenCV is installed, its bundled Haar cascade (`haarcascade_frontalface_default.xml`, a
  detector that is not ours) is asked the same question;
- each found face is aligned from its new detection to the run's template at S (`inference.paste.face_crop`, as the
  protected face was) and embedded by every FR model; with the target's images (`fr.target` of the run's data folder,
  or `target`) the rates are today's (`evaluation.report`): ASR = mean[cos(adv, target) > tau1], ESR = mean[cos(rec,
  target) < tau2], SMR = mean[cos(adv, src) > tau1], IRR = mean[cos(rec, src) > tau1], with `src` the original
  photo's face. A lost face is verified as no one (cosine -inf): it fails ASR and IRR, and counts for ESR and
  against SMR, as a pipeline that finds no face matches no one;
- the fraction of pixels changed outside the faces' regions (`paste.face_region_mask`: where the paste may write),
  against the original photo, and the face region's PSNR (over its pixels, 0..255) and LPIPS (its bounding box at the
  photo's full resolution) of the protected and the restored photo against the original;
- the same rates after a photo-sharing site's processing (`share`: longest side scaled to `SHARING_SIDE` px, JPEG
  quality `SHARING_QUALITY`, 4:2:0): the shared protected photo is what an outside FR system sees (ASR, SMR), and
  the trusted authority restores that shared copy (`erase_photos` scales the sidecar's transforms: ESR, IRR), with the
  shared original as the source.

Written: `OUT/photos_report.json`, `OUT/photos.png` (original | protected | restored per photo), the protected,
restored and shared photos.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from erasablemask_jax import image_io
from erasablemask_jax.align import detect
from erasablemask_jax.data import faces as faces_lib
from erasablemask_jax.data.pipeline import load_face_folder_arrays
from erasablemask_jax.inference import paste
from erasablemask_jax.inference import photos as photos_lib
from erasablemask_jax.inference import sidecar as sidecar_lib
from erasablemask_jax.inference.run import Run
from erasablemask_jax.inference.run import to_model_input
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import lpips as lpips_lib
from erasablemask_jax.metrics import recognition

log = logging.getLogger(__name__)

SHARING_SIDE = 1080
SHARING_QUALITY = 85
MATCH_IOU = 0.3
KINDS = ("clean", "adv", "rec")  # original, protected, restored photo
FIGURE_HEIGHT = 320


def share_bytes(image: np.ndarray, side: int = SHARING_SIDE, quality: int = SHARING_QUALITY) -> bytes:
  """The file a photo-sharing site serves: the longest side scaled down to `side` (Lanczos; never up), JPEG
  `quality` (PIL's default 4:2:0 chroma)."""
  img = Image.fromarray(image)
  if max(img.size) > side:
    r = side / max(img.size)
    img = img.resize((max(1, round(img.size[0] * r)), max(1, round(img.size[1] * r))), Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def share(image: np.ndarray) -> np.ndarray:
  """`share_bytes` decoded: the pixels an outside FR system sees."""
  return image_io.read_image(share_bytes(image), "shared")


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two (x1, y1, x2, y2) boxes."""
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def match(boxes: np.ndarray, box: np.ndarray) -> int | None:
  """Index of the box overlapping `box` most, if its IoU reaches `MATCH_IOU`."""
  if len(boxes) == 0:
    return None
  scores = [iou(b, box) for b in boxes]
  best = int(np.argmax(scores))
  return best if scores[best] >= MATCH_IOU else None


def haar_detector():
  """OpenCV's bundled frontal-face Haar cascade (a detector that is not ours), or `Unavailable` with the reason."""
  try:
    import cv2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return availability.Unavailable("OpenCV is not installed (pip install 'opencv-python-headless<5', in the dev "
                                    "extra): the independent detector check is skipped")
  path = pathlib.Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
  cascade = cv2.CascadeClassifier(str(path))
  if cascade.empty():
    return availability.Unavailable(f"OpenCV has no Haar cascade at {path} (OpenCV 5 dropped them; use 4.x)")

  def find(image: np.ndarray) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 boxes, on a copy scaled to at most 1000 px (as our detector's `max_side`)."""
    r = min(1.0, 1000.0 / max(image.shape[:2]))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if r < 1.0:
      gray = cv2.resize(gray, (round(gray.shape[1] * r), round(gray.shape[0] * r)), interpolation=cv2.INTER_AREA)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    boxes = np.asarray(found, np.float64).reshape(-1, 4) / r
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)

  return find


def _region_stats(orig: np.ndarray, other: np.ndarray, region: np.ndarray) -> dict[str, Any]:
  outside = ~region
  changed = np.any(orig != other, axis=-1)
  diff = (orig[region].astype(np.float64) - other[region]) ** 2
  mse = float(diff.mean()) if diff.size else 0.0
  return {"changed_outside": float(changed[outside].mean()) if outside.any() else 0.0,
          "changed_outside_pixels": int(changed[outside].sum()),
          "face_psnr": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


def _lpips_face(metric, orig: np.ndarray, other: np.ndarray, box: tuple[int, int, int, int]):
  t, l, b, r = box
  if isinstance(metric, availability.Unavailable):
    return metric
  a, c = orig[None, t:b, l:r], other[None, t:b, l:r]
  return lpips_lib.mean_lpips(metric, to_model_input(a), to_model_input(c))


def _target_images(run: Run, target: str | None, data_dir: str | None) -> np.ndarray:
  target = str(run.config.fr.target) if target is None else target
  if not target:
    raise ValueError("no target identity: the run's config has no fr.target; pass --target IMAGE|DIR|identity:K")
  folder = data_dir or str(run.config.data.manual_dir)
  arrays = load_face_folder_arrays(folder, run.image_size) if target.startswith("identity:") else {
      "identity": np.zeros((0,), np.int32)}
  return faces_lib.target_faces(target, arrays, run.image_size, folder)[0]


def _embed(model, crops: np.ndarray) -> np.ndarray:
  from erasablemask_jax.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel

  if not len(crops):
    return np.zeros((0, 1), np.float32)
  return report_lib._embed(model, to_model_input(crops))  # pylint: disable=protected-access


def _found_crops(image: np.ndarray, boxes: list[np.ndarray], size: int, template: str, haar=None
                 ) -> tuple[list[np.ndarray | None], list[bool] | None]:
  """Our detector on `image`: each recorded face's crop from its new detection (None when lost), and whether the Haar
  cascade finds each face (None without OpenCV)."""
  det = detect.detect_faces(image, photos_lib.DETECTOR)
  crops = []
  for box in boxes:
    i = match(det.boxes, box)
    crops.append(None if i is None else paste.face_crop(image, paste.face_transform(det.landmarks[i], size, template),
                                                        size))
  haar_found = None
  if callable(haar):
    found = haar(image)
    haar_found = [match(found, box) is not None for box in boxes]
  return crops, haar_found


def _rates(emb: dict[str, np.ndarray], found: dict[str, np.ndarray], target_emb: np.ndarray, model) -> dict[str, Any]:
  """ASR / ESR / SMR / IRR over all faces, a lost face scoring cosine -inf (verified as no one)."""

  def cosines(kind, against):
    out = np.full(len(found[kind]), -np.inf)
    ok = found[kind] & found["clean"] if against == "src" else found[kind]
    if ok.any():
      if against == "src":
        out[ok] = np.sum(emb[kind][ok] * emb["clean"][ok], axis=1)
      else:
        out[ok] = recognition.target_cosine(emb[kind][ok], target_emb)
    return out

  cos = {k: cosines(k, "target") for k in KINDS}
  src = {k: cosines(k, "src") for k in ("adv", "rec")}
  out = {"mean_cos": {k: _finite_mean(v) for k, v in cos.items()},
         "mean_cos_source": {k: _finite_mean(v) for k, v in src.items()},
         "cos": {k: [None if not np.isfinite(c) else float(c) for c in v] for k, v in cos.items()},
         "cos_source": {k: [None if not np.isfinite(c) else float(c) for c in v] for k, v in src.items()}}
  for name, fn, values, tau in (("asr_clean", recognition.attack_success_rate, cos["clean"], model.tau1),
                                ("asr", recognition.attack_success_rate, cos["adv"], model.tau1),
                                ("esr", recognition.erasure_success_rate, cos["rec"], model.tau2),
                                ("smr", recognition.source_match_rate, src["adv"], model.tau1),
                                ("irr", recognition.identity_recovery_rate, src["rec"], model.tau1)):
    out[name] = availability.to_json(availability.Unavailable("no threshold for this view (erasablemask calibrate)")
                                     if tau is None else fn(values, tau))
  return out


def _finite_mean(values: np.ndarray) -> float | None:
  v = values[np.isfinite(values)]
  return float(v.mean()) if v.size else None


def evaluate_photos(run: Run, photos_dir: str | os.PathLike[str], models: Sequence[Any],
                    out_dir: str | os.PathLike[str], *, attrs: str = "roll", target: str | None = None,
                    data_dir: str | None = None, options: photos_lib.PhotoOptions = photos_lib.PhotoOptions(),
                    lpips_weights=None, lpips_net: str = "alex", progress: bool = True) -> dict[str, Any]:
  """Scores the end-to-end photo path (module docstring); writes OUT/photos_report.json and OUT/photos.png.

  Args:
    run: the loaded run.
    photos_dir: a folder of photos (any size, any number of faces).
    models: FR models to score (`evaluation.report.load_eval_models`), each with its thresholds.
    out_dir: the report folder; its `protected/`, `restored/` and `shared/` subfolders are replaced.
    attrs: att_b spec (default `roll`, across all the folder's faces, as the report does).
    target: target identity (default the run's `fr.target` in `data_dir`, default the run's data folder).
    options: how photos are protected (`inference.photos.PhotoOptions`).
    lpips_weights, lpips_net: LPIPS (`metrics.lpips.load_lpips`; the `metrics` extra's weights by default).

  Raises:
    FileNotFoundError: `photos_dir` is not a folder, or no photo in it had a face to protect.
    ValueError: no target.
  """
  out_dir = pathlib.Path(out_dir)
  target_images = _target_images(run, target, data_dir)
  folders = {k: out_dir / k for k in ("protected", "restored", "shared/protected", "shared/restored")}
  for folder in folders.values():
    if folder.is_dir():
      shutil.rmtree(folder)  # the report's own outputs, rewritten whole
  protected = photos_lib.protect_photos(run, photos_dir, folders["protected"], attrs, options, progress=progress)
  photos_lib.erase_photos(run, folders["protected"], folders["restored"], progress=progress)
  sidecars = sorted(folders["protected"].rglob("*.json"))
  if not sidecars:
    raise FileNotFoundError(f"no photo under {photos_dir} had a face to protect ({protected.summary()})")
  size, template = run.image_size, photos_lib.run_template(run.config)
  haar = haar_detector()
  metric = lpips_lib.load_lpips(lpips_net, lpips_weights)
  records, figure_rows = [], []
  crops = {k: [] for k in KINDS + tuple(f"shared.{k}" for k in KINDS)}
  haar_hits = {k: [] for k in KINDS}
  for path in sidecars:
    side = sidecar_lib.read_photo_sidecar(path)
    stem = str(path.relative_to(folders["protected"]).with_suffix(""))
    images = {"clean": image_io.read_image(pathlib.Path(photos_dir) / side["source"]),
              "adv": image_io.read_image(folders["protected"] / side["output"]),
              "rec": image_io.read_image(folders["restored"] / f"{stem}.png")}
    transforms = [f["transform"] for f in side["faces"]]
    boxes = [np.asarray(f["box"], np.float64) for f in side["faces"]]
    region = paste.face_region_mask(np.stack(transforms), size, images["clean"].shape[:2], side["feather"])
    record = {"photo": side["source"], "size": list(images["clean"].shape[:2]), "faces": len(boxes),
              "same_size": all(v.shape == images["clean"].shape for v in images.values())}
    for kind in ("adv", "rec"):
      stats = _region_stats(images["clean"], images[kind], region)
      stats["face_lpips"] = [availability.to_json(_lpips_face(metric, images["clean"], images[kind],
                                                              paste.crop_region(m, size, region.shape)))
                             for m in transforms]
      record[kind] = stats
    # The sharing site: shared protected photos (with their sidecars) for the authority to restore.
    shared_dir = folders["shared/protected"] / pathlib.Path(stem).parent
    shared_dir.mkdir(parents=True, exist_ok=True)
    shared_bytes = share_bytes(images["adv"])
    shared_adv = image_io.read_image(shared_bytes, "shared")
    sidecar_lib.write_bytes_atomic(folders["shared/protected"] / f"{stem}.jpg", shared_bytes)
    shutil.copy(path, folders["shared/protected"] / f"{stem}.json")
    for kind, image in images.items():
      found, haar_found = _found_crops(image, boxes, size, template, haar)
      crops[kind] += found
      if haar_found is not None:
        haar_hits[kind] += haar_found
      record[f"lost_{kind}"] = int(sum(c is None for c in found))
    record["shared_scale"] = shared_adv.shape[0] / images["clean"].shape[0]
    records.append(record)
    figure_rows.append([images[k] for k in KINDS])
    images["shared.clean"] = share(images["clean"])
    images["shared.adv"] = shared_adv
    for kind in ("shared.clean", "shared.adv"):
      found = _found_crops(images[kind], [b * record["shared_scale"] for b in boxes], size, template)[0]
      crops[kind] += found
      record[f"lost_{kind}"] = int(sum(c is None for c in found))
  photos_lib.erase_photos(run, folders["shared/protected"], folders["shared/restored"], progress=progress)
  for path, record in zip(sidecars, records):
    stem = str(path.relative_to(folders["protected"]).with_suffix(""))
    side = sidecar_lib.read_photo_sidecar(path)
    rec = image_io.read_image(folders["shared/restored"] / f"{stem}.png")
    scaled = [np.asarray(f["box"], np.float64) * record["shared_scale"] for f in side["faces"]]
    found = _found_crops(rec, scaled, size, template)[0]
    crops["shared.rec"] += found
    record["lost_shared.rec"] = int(sum(c is None for c in found))
  report = _summarise(run, models, records, crops, haar_hits, haar, target_images, photos_dir, protected)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "photos_report.json").write_text(json.dumps(report, indent=2) + "\n")
  save_photo_figure(out_dir / "photos.png", figure_rows)
  return report


def _summarise(run, models, records, crops, haar_hits, haar, target_images, photos_dir, protected) -> dict[str, Any]:
  n = len(crops["clean"])
  found = {k: np.array([c is not None for c in v], bool) for k, v in crops.items()}
  blank = np.zeros((run.image_size, run.image_size, 3), np.uint8)
  stacked = {k: np.stack([blank if c is None else c for c in v]) for k, v in crops.items()}
  per_model = {}
  for m in models:
    target_emb = _embed(m, target_images)
    emb = {k: _embed(m, v) for k, v in stacked.items()}
    per_model[m.key] = {
        "spec": m.spec, "whitebox": m.whitebox, "view": m.view, "tau1": m.tau1, "tau2": m.tau2,
        "photos": _rates({k: emb[k] for k in KINDS}, {k: found[k] for k in KINDS}, target_emb, m),
        "shared": _rates({k: emb[f"shared.{k}"] for k in KINDS}, {k: found[f"shared.{k}"] for k in KINDS},
                         target_emb, m)}
  changed = {k: float(np.mean([r[k]["changed_outside"] for r in records])) for k in ("adv", "rec")}
  report = {
      "run": run.checkpoint_info(), "photos_dir": str(photos_dir), "photos": len(records), "faces": n,
      "not_protected": dict(protected.skipped), "image_size": run.image_size,
      "sharing": {"longest_side": SHARING_SIDE, "jpeg_quality": SHARING_QUALITY},
      "all_same_size": all(r["same_size"] for r in records),
      "lost": {k: int((~v).sum()) for k, v in found.items()},
      "lost_faces": {k: [f"{r['photo']}" for r in records if r.get(f"lost_{k}")] for k in found},
      "haar": (availability.to_json(haar) if isinstance(haar, availability.Unavailable) else
               {k: {"found": int(np.sum(v)), "of": len(v)} for k, v in haar_hits.items()}),
      "changed_outside_faces": {"mean": changed, "max": {k: float(max(r[k]["changed_outside"] for r in records))
                                                          for k in ("adv", "rec")}},
      "face_psnr": {k: float(np.mean([r[k]["face_psnr"] for r in records])) for k in ("adv", "rec")},
      "face_lpips": {k: _mean_available([v for r in records for v in r[k]["face_lpips"]]) for k in ("adv", "rec")},
      "models": per_model, "per_photo": records}
  return report


def _mean_available(values: list) -> Any:
  numbers = [v for v in values if isinstance(v, (int, float))]
  if not numbers:
    return values[0] if values else None
  return float(np.mean(numbers))


def save_photo_figure(path: str | os.PathLike[str], rows: list[list[np.ndarray]], height: int = FIGURE_HEIGHT) -> None:
  """One row per photo, its columns (original | protected | restored) scaled to `height` px, on white; atomic."""
  scaled_rows = []
  for row in rows:
    cells = []
    for image in row:
      img = Image.fromarray(image)
      w = max(1, round(img.size[0] * height / img.size[1]))
      cells.append(np.asarray(img.resize((w, height), Image.Resampling.LANCZOS)))
      cells.append(np.full((height, 8, 3), 255, np.uint8))
    scaled_rows.append(np.concatenate(cells[:-1], axis=1))
  width = max(r.shape[1] for r in scaled_rows)
  canvas = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in scaled_rows]
  sidecar_lib.write_png_atomic(path, np.concatenate(canvas, axis=0))


def format_photos_report(report: dict[str, Any]) -> str:
  """Markdown lines of the photo report."""
  lines = [f"Photos: {report['photos']} photos, {report['faces']} faces protected at {report['image_size']} px and "
           f"put back at each photo's own size (all same size: {report['all_same_size']}).",
           f"- pixels changed outside the faces: protected {100 * report['changed_outside_faces']['mean']['adv']:.3f}% "
           f"(max {100 * report['changed_outside_faces']['max']['adv']:.3f}%), restored "
           f"{100 * report['changed_outside_faces']['mean']['rec']:.3f}%",
           f"- face region PSNR vs original: protected {report['face_psnr']['adv']:.2f} dB, restored "
           f"{report['face_psnr']['rec']:.2f} dB; LPIPS protected {_fmt(report['face_lpips']['adv'])}, restored "
           f"{_fmt(report['face_lpips']['rec'])}",
           "- faces lost by our detector: " + ", ".join(f"{k} {v}" for k, v in report["lost"].items())]
  haar = report["haar"]
  if isinstance(haar, dict) and "found" in haar.get("clean", {}):
    lines.append("- OpenCV Haar cascade (not our detector) finds: " + ", ".join(
        f"{k} {v['found']}/{v['of']}" for k, v in haar.items()))
  else:
    lines.append(f"- OpenCV Haar check: {haar}")
  lines += ["", "| model | ASR clean | ASR | ESR | SMR | IRR | shared: ASR | ESR | SMR | IRR |", "|---" * 10 + "|"]
  for key, m in report["models"].items():
    p, s = m["photos"], m["shared"]
    lines.append(f"| {key} | " + " | ".join(_pct(p[k]) for k in ("asr_clean", "asr", "esr", "smr", "irr")) + " | "
                 + " | ".join(_pct(s[k]) for k in ("asr", "esr", "smr", "irr")) + " |")
  lines.append(f"(shared: longest side {report['sharing']['longest_side']} px, JPEG quality "
               f"{report['sharing']['jpeg_quality']}; restored from the shared copy)")
  return "\n".join(lines)


def _pct(v) -> str:
  return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "n/a"


def _fmt(v) -> str:
  return f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"


# ---------------------------------------------------------------------------------------------------------------------
# The demo's closing act: the held-out people's original photos, protected and restored.

ASSETS_ENV = "ERASABLEMASK_ASSETS"


def assets_dir() -> pathlib.Path:
  """The shared assets: `$ERASABLEMASK_ASSETS`, else `../shared/assets` from the working directory (the README's
  layout, as `python -m erasablemask_jax.data.sample` assumes)."""
  return pathlib.Path(os.environ.get(ASSETS_ENV, "../shared/assets"))


def original_photos(files: Sequence[str], assets: pathlib.Path) -> dict[str, pathlib.Path]:
  """The original photo of each bundled sample face in `files` (`data.sample.sources`), where it exists."""
  from erasablemask_jax.data import sample  # pylint: disable=import-outside-toplevel

  if not (assets / "images/deepface_pairs/identity_clusters.csv").is_file():
    return {}
  by_name = {name: path for name, path, _ in sample.sources(assets)}
  return {f: by_name[f] for f in files if f in by_name and by_name[f].is_file()}


def demo_photos(workdir: str | os.PathLike[str], files: Sequence[str], manual_dir: str,
                assets: pathlib.Path | None = None, progress: bool = False) -> tuple[dict[str, Any] | None, str]:
  """Protects and restores the original photos of the held-out faces `files` with the finished run in `workdir`,
  scored as the white-box report scores (the run's surrogates and thresholds); writes `workdir/photos/` and
  `workdir/photos.png`.

  Returns:
    (the report, or None when skipped; one line saying what happened).
  """
  from erasablemask_jax import inference  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel

  if manual_dir != "bundled:sample_faces":
    return None, "photos: skipped (the held-out faces are not the bundled sample faces, whose originals are known)"
  assets = assets_dir() if assets is None else assets
  originals = original_photos(files, assets)
  if not originals:
    return None, (f"photos: skipped: the held-out people's original photos are in the shared assets, not found at "
                  f"{assets} (set {ASSETS_ENV} to their folder to see protect and erase on whole photos)")
  workdir = pathlib.Path(workdir)
  folder = workdir / "photos" / "originals"
  if folder.is_dir():
    shutil.rmtree(folder)
  folder.mkdir(parents=True)
  for name, src in sorted(originals.items()):
    shutil.copy(src, folder / f"{pathlib.Path(name).stem}{src.suffix.lower()}")
  run = inference.load_run(workdir)
  models = report_lib.load_eval_models(list(run.config.fr.surrogates), [], run.config)
  report = evaluate_photos(run, folder, models, workdir / "photos", progress=progress)
  shutil.copy(workdir / "photos" / "photos.png", workdir / "photos.png")
  return report, f"photos: {len(originals)} original photos protected and restored (photos.png, photos/)"
