"""Whole photos in, whole photos out: `protect_photos` and `erase_photos`, behind `erasablemask protect` / `erase`.

Protect, per photo under the input folder (recursive; `image_io.read_image`: EXIF orientation applied, 16-bit, CMYK,
palette and alpha photos converted to 8-bit RGB, unreadable files skipped with the reason):
  1. one MTCNN pass (`align.detect`, `DETECTOR`) finds every face, or with `largest_face` the one `align.detect.
     select_face` picks; a face whose box is smaller than `min_face_size` pixels (its longer side, in the photo's
     pixels) is skipped and recorded with its size;
  2. each face is aligned to the run's template (`run_template`) at the run's side S (`paste.face_crop`);
  3. ONE generator call protects all the photo's faces (`Run.protect`, one jitted batch when the photo has at most
     `batch_size` faces): `x_adv = G(x, att_b; E_adv)`;
  4. the change `x_adv - x` of each face is added to the photo at its own resolution through a feathered mask over
     the face's aligned square (`paste.paste_changes`, whose docstring says why the change and not the face); pixels
     outside every face's square are the photo's own;
  5. the photo is written at its own size as `OUT/<relative path>.png` (lossless, so the perturbation survives), or
     `.jpg` with `output_format="jpeg"` (quality `quality`, 4:4:4 chroma), with the sidecar `OUT/<relative path>.json`
     (`sidecar.make_photo_sidecar`: every face's box, landmarks, transform, att_a, att_b; the checkpoint fingerprint).
     Metadata is not copied: the orientation is applied to the pixels and the EXIF block (GPS included) is dropped.
A photo without a usable face is one summary line ("no face found") and is skipped, or copied unchanged (its bytes)
with `copy_unprotected`.

att_a of a face: the input folder's `attributes.csv` row of its photo when the photo has exactly one protected face
(the labels describe a person, and a row cannot say which of several faces it means), else D_att's prediction on the
face's crop. att_b: the `--attrs` spec applied to all the folder's faces at once (so `roll` permutes across photos).

Erase reads each protected photo's sidecar, takes every face through its recorded transform (scaled, if the photo was
resized since, e.g. by a sharing site), restores it, `x_rec = R(x_adv, att_a)`, and adds `x_rec - x_adv` the same
way, writing `OUT/<relative path>.png` at the photo's size. Existing outputs are never overwritten without `force`,
checked before any work; every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from erasablemask_jax import image_io
from erasablemask_jax.align import detect
from erasablemask_jax.inference import attributes as attributes_lib
from erasablemask_jax.inference import paste
from erasablemask_jax.inference import sidecar as sidecar_lib
from erasablemask_jax.inference.folders import FolderResult
from erasablemask_jax.inference.folders import _check_outputs
from erasablemask_jax.inference.folders import _progress
from erasablemask_jax.inference.folders import _unique_outputs
from erasablemask_jax.inference.folders import attribute_rows
from erasablemask_jax.inference.run import Run
from erasablemask_jax.inference.run import to_model_input

log = logging.getLogger(__name__)

# MTCNN as the aligner runs it, but looking for faces down to 20 px of the (<= 1000 px) detection copy, so that a face
# below --min-face-size is found, reported with its size and skipped rather than silently missed.
DETECTOR = detect.DetectorConfig(min_face=20.0)
DEFAULT_MIN_FACE_SIZE = 40.0
FORMATS = {"png": ".png", "jpeg": ".jpg"}
NO_FACE = "no face found"


def run_template(config) -> str:
  """The face template a run's generator was trained on: our aligner's `loose` crop, which every aligned builder and
  the bundled sample faces use (`data.builders`, `data.sample`)."""
  del config  # one template today; the run's config is where a second one would be chosen
  return "loose"


@dataclasses.dataclass(frozen=True)
class PhotoOptions:
  """How photos are protected.

  Attributes:
    largest_face: protect only the face `align.detect.select_face` picks (the largest confident one).
    min_face_size: faces whose box's longer side is below this many photo pixels are skipped (and reported).
    output_format: 'png' (default, lossless) or 'jpeg'.
    quality: JPEG quality 1..95 for `output_format='jpeg'`.
    copy_unprotected: copy a photo without a usable face to OUT unchanged (else it is skipped).
    feather: the paste mask's ramp width, as a fraction of the crop side (`paste.FEATHER`).
  """

  largest_face: bool = False
  min_face_size: float = DEFAULT_MIN_FACE_SIZE
  output_format: str = "png"
  quality: int = 95
  copy_unprotected: bool = False
  feather: float = paste.FEATHER

  def __post_init__(self):
    if self.output_format not in FORMATS:
      raise ValueError(f"--format {self.output_format!r}: choose png or jpeg")
    if not 1 <= int(self.quality) <= 95:
      raise ValueError(f"--quality {self.quality}: choose a JPEG quality from 1 to 95")


@dataclasses.dataclass(frozen=True)
class Face:
  """A detected face: box (x1, y1, x2, y2) and landmarks (5, 2) in photo pixels, its MTCNN score, and the (2, 3)
  photo -> crop transform onto the run's template."""

  box: np.ndarray
  score: float
  landmarks: np.ndarray
  transform: np.ndarray

  @property
  def size(self) -> float:
    return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

  def to_json(self) -> dict[str, Any]:
    return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 5),
            "size": round(self.size, 1), "landmarks": [[round(float(x), 3), round(float(y), 3)]
                                                       for x, y in self.landmarks],
            "transform": [[float(v) for v in row] for row in self.transform]}


def find_faces(image: np.ndarray, size: int, template: str, options: PhotoOptions = PhotoOptions(),
               detector: detect.DetectorConfig = DETECTOR) -> tuple[list[Face], list[dict[str, Any]]]:
  """One detector pass: the faces to protect (highest score first) and the skipped ones `{box, size, reason}`."""
  det = detect.detect_faces(image, detector)
  order = list(range(len(det)))
  if options.largest_face and len(det):
    order = [detect.select_face(det, image.shape[:2])]
  faces, skipped = [], []
  for i in order:
    face = Face(det.boxes[i], float(det.scores[i]), det.landmarks[i],
                paste.face_transform(det.landmarks[i], size, template))
    if face.size < options.min_face_size:
      skipped.append({"box": face.to_json()["box"], "size": round(face.size, 1),
                      "reason": f"face of {face.size:.0f} px is below --min-face-size {options.min_face_size:g}"})
    else:
      faces.append(face)
  return faces, skipped


def face_crops(image: np.ndarray, transforms: list[np.ndarray], size: int) -> np.ndarray:
  """uint8 (N, S, S, 3): every face's aligned crop (`paste.face_crop`)."""
  if not transforms:
    return np.zeros((0, size, size, 3), np.uint8)
  return np.stack([paste.face_crop(image, m, size) for m in transforms])


def to_pixels(x: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> 0..255 float (unrounded: the change is added before the photo is rounded once)."""
  return (np.asarray(x, np.float32) + 1.0) * 127.5


def protect_faces(run: Run, image: np.ndarray, transforms: list[np.ndarray], att_b: np.ndarray,
                  feather: float = paste.FEATHER) -> tuple[np.ndarray, np.ndarray]:
  """One photo protected: (the photo with every face's change pasted, uint8 (H, W, 3); x_adv float (N, S, S, 3)).

  One batched generator call for all the faces (`Run.protect`)."""
  crops = face_crops(image, transforms, run.image_size)
  if not len(crops):
    return image.copy(), np.zeros((0,) + crops.shape[1:], np.float32)
  x_adv, _ = run.protect(to_model_input(crops), np.asarray(att_b, np.float32))
  return paste.paste_changes(image, to_pixels(x_adv) - crops, np.stack(transforms), feather), x_adv


def restore_faces(run: Run, image: np.ndarray, transforms: list[np.ndarray], att_a: np.ndarray,
                  feather: float = paste.FEATHER) -> np.ndarray:
  """One protected photo restored: each face's `R(x_adv, att_a) - x_adv` added back the same way (one R call)."""
  crops = face_crops(image, transforms, run.image_size)
  if not len(crops):
    return image.copy()
  x_rec = run.restore(to_model_input(crops), np.asarray(att_a, np.float32))
  return paste.paste_changes(image, to_pixels(x_rec) - crops, np.stack(transforms), feather)


def encode(image: np.ndarray, output_format: str = "png", quality: int = 95) -> bytes:
  """uint8 RGB -> PNG bytes, or JPEG at `quality` with 4:4:4 chroma (no subsampling of the perturbation)."""
  buf = io.BytesIO()
  if output_format == "jpeg":
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=int(quality), subsampling=0)
  else:
    Image.fromarray(image, "RGB").save(buf, format="PNG")
  return buf.getvalue()


def _inputs(in_dir: pathlib.Path, out_dir: pathlib.Path, suffix: str, result: FolderResult, force: bool,
            sidecars: bool = True) -> list[dict[str, Any]]:
  """The photos under `in_dir` with their output names; names that collide are skipped; existing outputs refused."""
  items = [{"path": path, "rel": rel, "stem": stem} for path, rel, stem in _unique_outputs(in_dir, suffix, result)]
  names = (suffix, ".json") if sidecars else (suffix,)
  _check_outputs([out_dir / f"{it['stem']}{ext}" for it in items for ext in names], force)
  return items


def protect_photos(run: Run, in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   attrs: str = attributes_lib.DEFAULT_PROTECT_SPEC, options: PhotoOptions = PhotoOptions(),
                   force: bool = False, progress: bool = True) -> FolderResult:
  """Protects every face of every photo under `in_dir` into `out_dir` (module docstring).

  Raises:
    FileNotFoundError: `in_dir` is not a folder.
    OutputExistsError: an output exists and `force` is False (checked before any work; nothing is written).
    AttributeSpecError: `attrs` is malformed, or `roll` with fewer than 2 faces in the folder.
  """
  in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
  if not in_dir.is_dir():
    raise FileNotFoundError(f"--in {in_dir} is not a folder of photos")
  spec = attributes_lib.parse_spec(attrs)
  suffix = FORMATS[options.output_format]
  result = FolderResult()
  items = _inputs(in_dir, out_dir, suffix, result, force)
  template, size = run_template(run.config), run.image_size
  photos = []
  with _progress(len(items), "detect", progress) as bar:
    for it in items:
      bar.update(1)
      try:
        image = image_io.read_image(it["path"], it["rel"])
      except image_io.SkipImage as e:
        result.skipped[it["rel"]] = str(e)
        continue
      faces, small = find_faces(image, size, template, options)
      if not faces:
        reason = NO_FACE + (f" of at least {options.min_face_size:g} px ("
                            + "; ".join(s["reason"] for s in small) + ")" if small else "")
        if options.copy_unprotected:
          sidecar_lib.write_bytes_atomic(out_dir / it["rel"], it["path"].read_bytes())
          result.written.append(it["rel"])
          result.notes[it["rel"]] = reason + "; copied unchanged (--copy-unprotected)"
        else:
          result.skipped[it["rel"]] = reason + "; not written (pass --copy-unprotected to copy it unchanged)"
        continue
      photos.append({**it, "faces": faces, "small": small, "source_size": image.shape[:2],
                     "crops": face_crops(image, [f.transform for f in faces], size)})
  if not photos:
    return result
  att_a, sources = _source_attributes(run, in_dir, photos)
  att_b = spec.apply(att_a)
  config, start = run.config, 0
  with _progress(len(photos), "protect", progress) as bar:
    for ph in photos:
      n = len(ph["faces"])
      # Read again rather than kept from the detection pass: a folder of 12-megapixel photos is never all in memory.
      image = image_io.read_image(ph["path"], ph["rel"])
      out, _ = protect_faces(run, image, [f.transform for f in ph["faces"]], att_b[start:start + n], options.feather)
      faces = [{**f.to_json(), "att_a": [int(v) for v in att_a[start + j]], "att_a_source": sources[start + j],
                "att_b": [int(v) for v in att_b[start + j]],
                "flipped": attributes_lib.flipped_names(att_a[start + j], att_b[start + j])}
               for j, f in enumerate(ph["faces"])]
      start += n
      name = f"{ph['stem']}{suffix}"
      sidecar_lib.write_bytes_atomic(out_dir / name, encode(out, options.output_format, options.quality))
      sidecar_lib.write_json_atomic(out_dir / f"{ph['stem']}.json", sidecar_lib.make_photo_sidecar(
          source=ph["rel"], source_size=ph["source_size"], output=name, output_format=options.output_format,
          quality=options.quality if options.output_format == "jpeg" else None, image_size=size, template=template,
          feather=options.feather, faces=faces, skipped_faces=ph["small"], attrs_spec=spec.to_json(),
          checkpoint=run.checkpoint_info(), target=str(config.fr.target), surrogates=list(config.fr.surrogates)))
      result.written.append(name)
      if ph["small"]:  # only photos with something to say get a summary line
        result.notes[name] = (f"{n} face{'s' * (n > 1)} protected; skipped: "
                              + "; ".join(s["reason"] for s in ph["small"]))
      bar.update(1)
  return result


def _source_attributes(run: Run, in_dir: pathlib.Path, photos: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
  """att_a (N, 13) for all faces of all photos, in order, and where each came from (module docstring)."""
  rows = attribute_rows(in_dir)
  crops = np.concatenate([ph["crops"] for ph in photos])
  att_a = attributes_lib.predicted(run.attribute_logits(to_model_input(crops)))
  sources = ["d_att"] * len(crops)
  start = 0
  for ph in photos:
    n = len(ph["faces"])
    if n == 1 and ph["rel"] in rows:
      att_a[start], sources[start] = rows[ph["rel"]][0], "attributes.csv"
    start += n
  return att_a, sources


def is_photo_folder(in_dir: str | os.PathLike[str]) -> bool:
  """True when some sidecar under `in_dir` is a protected photo's (`sidecar.PHOTO_FORMAT`)."""
  for path in pathlib.Path(in_dir).rglob("*.json"):
    try:
      if sidecar_lib.PHOTO_FORMAT in path.read_text()[:200]:
        return True
    except (OSError, UnicodeDecodeError):
      continue
  return False


def erase_photos(run: Run, in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], force: bool = False,
                 progress: bool = True) -> FolderResult:
  """Restores every protected photo under `in_dir` into `out_dir/<relative path>.png` (module docstring).

  A photo without a photo sidecar is skipped with the reason; one protected by another checkpoint is restored with a
  warning; one resized since protection (same aspect ratio) has its transforms scaled (`paste.rescale_transform`).

  Raises:
    FileNotFoundError: `in_dir` is not a folder.
    OutputExistsError: an output exists and `force` is False (nothing is written).
  """
  in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
  if not in_dir.is_dir():
    raise FileNotFoundError(f"--in {in_dir} is not a folder of protected photos")
  result = FolderResult()
  items = _inputs(in_dir, out_dir, ".png", result, force, sidecars=False)
  with _progress(len(items), "erase", progress) as bar:
    for it in items:
      bar.update(1)
      rel = it["rel"]
      try:
        side = sidecar_lib.read_photo_sidecar(sidecar_lib.sidecar_path(it["path"]))
        image = image_io.read_image(it["path"], rel)
      except (sidecar_lib.SidecarError, image_io.SkipImage) as e:
        if isinstance(e, sidecar_lib.SidecarError) and _is_aligned_sidecar(sidecar_lib.sidecar_path(it["path"])):
          e = "protected as an aligned crop: erase it with --aligned"
        result.skipped[rel] = str(e)
        continue
      if side["checkpoint"].get("params_sha256") != run.fingerprint:
        log.warning("%s was protected by another checkpoint (%s) than this run's (%s)", rel,
                    str(side["checkpoint"].get("params_sha256", "?"))[:12], run.fingerprint[:12])
      if side["image_size"] != run.image_size:
        result.skipped[rel] = (f"protected at {side['image_size']} px by another run; this run works at "
                               f"{run.image_size} px")
        continue
      try:
        transforms = photo_transforms(side, image.shape[:2])
      except ValueError as e:
        result.skipped[rel] = str(e)
        continue
      att_a = np.stack([f["att_a"] for f in side["faces"]]) if side["faces"] else np.zeros((0, 13), np.float32)
      out = restore_faces(run, image, transforms, att_a, float(side.get("feather", paste.FEATHER)))
      name = f"{it['stem']}.png"
      sidecar_lib.write_bytes_atomic(out_dir / name, encode(out))
      result.written.append(name)
  return result


def photo_transforms(side: dict[str, Any], image_hw: tuple[int, int]) -> list[np.ndarray]:
  """The sidecar's face transforms for a photo of size `image_hw` (scaled when it was resized since protection).

  Raises:
    ValueError: the photo's aspect ratio is not the protected one's (cropped or rotated since), so the faces cannot be
      found again.
  """
  h0, w0 = side["source_size"]
  transforms = [f["transform"] for f in side["faces"]]
  if tuple(image_hw) == (h0, w0):
    return transforms
  rh, rw = image_hw[0] / h0, image_hw[1] / w0
  if abs(rh - rw) > 0.01 * max(rh, rw) + 1.0 / min(image_hw):
    raise ValueError(f"{image_hw[1]}x{image_hw[0]} is not the protected photo's {w0}x{h0} or a resized copy of it "
                     "(cropped or rotated since?), so its faces cannot be found again")
  return [paste.rescale_transform(m, (h0, w0), image_hw) for m in transforms]


def _is_aligned_sidecar(path: pathlib.Path) -> bool:
  try:
    sidecar_lib.read_sidecar(path)
    return True
  except sidecar_lib.SidecarError:
    return False
