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
  if not path.is_file():
    raise SidecarError(f"no sidecar {path}: erase needs the JSON that `erasablemask protect` wrote beside the image; "
                       "pass --source-attrs (bits, a CSV, or 'predicted') instead")
  try:
    payload = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise SidecarError(f"sidecar {path} is not valid JSON ({e}); restore it or pass --source-attrs") from e
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise SidecarError(f"sidecar {path} is not an {FORMAT} file; pass --source-attrs instead")
  if list(payload.get("attributes", ATTRIBUTES)) != list(ATTRIBUTES):
    raise SidecarError(f"sidecar {path} lists attributes {payload.get('attributes')}, this version uses {ATTRIBUTES}")
  if not isinstance(payload.get("checkpoint"), dict):
    raise SidecarError(f"sidecar {path} has no \"checkpoint\" entry (the run that protected the image), so it was not "
                       "written by `erasablemask protect`; protect the original again, or pass --source-attrs")
  for key in ("att_a", "att_b"):
    value = payload.get(key)
    if not isinstance(value, list) or len(value) != NUM_ATTRIBUTES or any(v not in (0, 1) for v in value):
      raise SidecarError(f"sidecar {path}: {key} must be {NUM_ATTRIBUTES} values 0/1, got {value!r}")
    payload[key] = np.asarray(value, np.float32)
  return payload
