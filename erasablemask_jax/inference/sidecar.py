"""The JSON sidecar beside every protected image, and writes that never leave a half-written file.

A protected image `OUT/a/b.png` has the sidecar `OUT/a/b.json`:

  {"format": "erasablemask-protect/1",
   "source": "a/b.jpg",                       # path relative to the input folder
   "source_size": [H, W],                     # before the centre crop / resize to the model's resolution
   "image_size": S,
   "attributes": [13 names],
   "att_a": [13 x 0/1], "att_a_source": "attributes.csv" | "d_att",
   "att_b": [13 x 0/1], "attrs_spec": "flip:Eyeglasses", "flipped": ["Eyeglasses"],
   "checkpoint": {"workdir": ..., "step": N, "params_sha256": ...},
   "target": <config fr.target>, "surrogates": [<config fr.surrogates>]}
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from erasablemask_jax.data.labels import ATTRIBUTES
from erasablemask_jax.data.labels import NUM_ATTRIBUTES

FORMAT = "erasablemask-protect/1"


class SidecarError(ValueError):
  """A sidecar is missing or malformed; the message names the file and the way out."""


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it over `path` (atomic on POSIX)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_path(path)
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_png_atomic(path: str | os.PathLike[str], image: np.ndarray) -> None:
  """A uint8 RGB (H, W, 3) image as PNG, written atomically."""
  import io  # pylint: disable=import-outside-toplevel

  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buf, format="PNG")
  write_bytes_atomic(path, buf.getvalue())


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
  write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def sidecar_path(image_path: str | os.PathLike[str]) -> pathlib.Path:
  """`x/y.png` -> `x/y.json`."""
  return pathlib.Path(image_path).with_suffix(".json")


def make_sidecar(source: str, source_size: tuple[int, int], image_size: int, att_a: np.ndarray, att_a_source: str,
                 att_b: np.ndarray, attrs_spec: str, flipped: list[str], checkpoint: dict[str, Any], target: str,
                 surrogates: list[str]) -> dict[str, Any]:
  """The sidecar dict (module docstring for the fields)."""
  return {"format": FORMAT, "source": source, "source_size": [int(v) for v in source_size],
          "image_size": int(image_size), "attributes": list(ATTRIBUTES),
          "att_a": [int(round(float(v))) for v in att_a], "att_a_source": att_a_source,
          "att_b": [int(round(float(v))) for v in att_b], "attrs_spec": attrs_spec, "flipped": list(flipped),
          "checkpoint": dict(checkpoint), "target": target, "surrogates": list(surrogates)}


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and checks a sidecar; `att_a` / `att_b` come back as float32 (13,) arrays.

  Raises:
    SidecarError: missing, not JSON, another format, no `checkpoint` entry, or attribute vectors of the wrong
      length.
  """
  path = pathlib.Path(path)
  payload = _read_checked(path, FORMAT, what="image", fix="pass --source-attrs (bits, a CSV, or 'predicted') instead")
  for key in ("att_a", "att_b"):
    value = payload.get(key)
    if not isinstance(value, list) or len(value) != NUM_ATTRIBUTES or any(v not in (0, 1) for v in value):
      raise SidecarError(f"sidecar {path}: {key} must be {NUM_ATTRIBUTES} values 0/1, got {value!r}")
    payload[key] = np.asarray(value, np.float32)
  return payload


# ---------------------------------------------------------------------------------------------------------------------
# Whole photos (`inference.photos`): one sidecar per photo, one entry per protected face.

PHOTO_FORMAT = "erasablemask-photo/1"


def make_photo_sidecar(source: str, source_size: tuple[int, int], output: str, output_format: str,
                       quality: int | None, image_size: int, template: str, feather: float, faces: list[dict[str, Any]],
                       skipped_faces: list[dict[str, Any]], attrs_spec: str, checkpoint: dict[str, Any], target: str,
                       surrogates: list[str]) -> dict[str, Any]:
  """The sidecar of a protected photo `OUT/a/b.png` (`OUT/a/b.json`).

    {"format": "erasablemask-photo/1", "source": "a/b.jpg", "source_size": [H, W], "output": "a/b.png",
     "output_format": "png" | "jpeg", "jpeg_quality": Q | null, "image_size": S, "template": "loose", "feather": f,
     "attributes": [13 names], "attrs_spec": ..., "checkpoint": {"workdir", "step", "params_sha256"},
     "target": ..., "surrogates": [...],
     "faces": [{"box": [x1, y1, x2, y2], "score": p, "size": px, "landmarks": [[x, y] x 5],
                "transform": [[a, b, c], [d, e, f]],          # photo pixel centre -> S x S crop (inference.paste)
                "att_a": [13 x 0/1], "att_a_source": "attributes.csv" | "d_att", "att_b": [13 x 0/1],
                "flipped": [...]}],
     "skipped_faces": [{"box": [...], "size": px, "reason": "..."}]}
  """
  return {"format": PHOTO_FORMAT, "source": source, "source_size": [int(v) for v in source_size], "output": output,
          "output_format": output_format, "jpeg_quality": quality, "image_size": int(image_size),
          "template": template, "feather": float(feather), "attributes": list(ATTRIBUTES), "attrs_spec": attrs_spec,
          "checkpoint": dict(checkpoint), "target": target, "surrogates": list(surrogates), "faces": faces,
          "skipped_faces": skipped_faces}


def read_any_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
  """A protected photo's sidecar (`PHOTO_FORMAT`, checked by `read_photo_sidecar`) or an aligned crop's
  (`read_sidecar`), by its "format"."""
  path = pathlib.Path(path)
  try:
    payload = json.loads(path.read_text()) if path.is_file() else None
  except (ValueError, UnicodeDecodeError):
    payload = None
  if isinstance(payload, dict) and payload.get("format") == PHOTO_FORMAT:
    return read_photo_sidecar(path)
  return read_sidecar(path)


def read_photo_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and checks a photo sidecar: every face's `transform` comes back as float64 (2, 3), `att_a` / `att_b` as
  float32 (13,).

  Raises:
    SidecarError: missing, not JSON, another format, no checkpoint, or a face entry that cannot be used.
  """
  path = pathlib.Path(path)
  payload = _read_checked(path, PHOTO_FORMAT, what="photo (each face's transform and attributes)",
                          fix="protect the original again")
  faces = payload.get("faces")
  if not isinstance(faces, list) or not isinstance(payload.get("image_size"), int):
    raise SidecarError(f"sidecar {path} has no \"faces\" list or \"image_size\"; protect the original again")
  for i, face in enumerate(faces):
    try:
      face["transform"] = np.asarray(face["transform"], np.float64).reshape(2, 3)
      for key in ("att_a", "att_b"):
        value = face[key]
        if len(value) != NUM_ATTRIBUTES or any(v not in (0, 1) for v in value):
          raise ValueError(f"{key} must be {NUM_ATTRIBUTES} values 0/1, got {value!r}")
        face[key] = np.asarray(value, np.float32)
      if not np.isfinite(face["transform"]).all() or abs(np.linalg.det(face["transform"][:, :2])) < 1e-12:
        raise ValueError("its transform is not an invertible similarity")
    except (KeyError, TypeError, ValueError) as e:
      raise SidecarError(f"sidecar {path}, face {i}: {e}; protect the original again") from e
  return payload


def _read_checked(path: pathlib.Path, fmt: str, what: str, fix: str) -> dict[str, Any]:
  """The checks both sidecar formats share: the file exists, is a JSON object of format `fmt`, lists this version's
  attributes and names the checkpoint that protected the image. `what` names the protected file, `fix` the way out."""
  if not path.is_file():
    raise SidecarError(f"no sidecar {path}: erase needs the JSON that `erasablemask protect` wrote beside the {what}; "
                       f"{fix}")
  try:
    payload = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise SidecarError(f"sidecar {path} is not valid JSON ({e}); restore it from the protect output, or {fix}") from e
  if not isinstance(payload, dict) or payload.get("format") != fmt:
    raise SidecarError(f"sidecar {path} is not an {fmt} file; {fix}")
  if list(payload.get("attributes", ATTRIBUTES)) != list(ATTRIBUTES):
    raise SidecarError(f"sidecar {path} lists attributes {payload.get('attributes')}, this version uses {ATTRIBUTES}")
  if not isinstance(payload.get("checkpoint"), dict):
    raise SidecarError(f"sidecar {path} has no \"checkpoint\" entry (the run that protected it), so it was not "
                       f"written by `erasablemask protect`; {fix}")
  return payload
