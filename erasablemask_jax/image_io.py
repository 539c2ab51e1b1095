"""Image I/O: reading face photos robustly, the uint8 <-> [-1, 1] conversions, and writing PNG grids.

The models see images as float32 in [-1, 1]; a pixel `p` is `p / 127.5 - 1` (`uint8_to_minus1_1`) and back
`round((x + 1) * 127.5)` clipped to [0, 255] (`to_uint8`), the PNG `protect` writes. These two are the only
definitions of the mapping in the package.

Reading: every odd file is converted to uint8 RGB or skipped, with the reason recorded.

Handled: truncated or corrupt files (skipped), EXIF orientation (applied), grayscale / palette / 1-bit (expanded to
RGB), RGBA / LA / PA (composited on white), CMYK and YCbCr (converted), 16-bit modes (scaled from 0..65535 to 8 bit),
32-bit integer or float modes (rescaled to 8 bit from the range their values suggest), images smaller than a minimum
side (skipped), images over PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`; skipped from their header, before
any pixel is decoded). Every command reads photos through `read_image`, so they all see the same pixels.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import pathlib
import warnings

import jax
import numpy as np
from PIL import Image
from PIL import ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

log = logging.getLogger(__name__)


class SkipImage(Exception):
  """This file cannot be used; `str(e)` is the reason recorded in the report."""


@dataclasses.dataclass
class ImportReport:
  """Counts of what happened to each input file while preparing a dataset."""

  read: int = 0
  written: int = 0
  converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped_files: dict = dataclasses.field(default_factory=dict)

  def convert(self, name: str, reason: str) -> None:
    self.converted[reason] += 1
    log.info("%s: %s", name, reason)

  def skip(self, name: str, reason: str) -> None:
    self.skipped[reason.split(":")[0]] += 1
    self.skipped_files[name] = reason
    log.warning("skipping %s: %s", name, reason)

  def summary(self) -> str:
    parts = [f"{self.written} written of {self.read} read"]
    if self.converted:
      parts.append("converted: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.converted.items())))
    if self.skipped:
      parts.append("skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items())))
    return "; ".join(parts)

  def to_json(self) -> str:
    return json.dumps({"read": self.read, "written": self.written, "converted": dict(self.converted),
                       "skipped": dict(self.skipped), "skipped_files": self.skipped_files}, indent=1, sort_keys=True)


def _to_rgb(img: Image.Image, note) -> Image.Image:
  mode = img.mode
  if mode == "RGB":
    return img
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    arr = np.asarray(img).astype(np.float64)
    if mode.startswith("I;16"):  # the depth is known: a dark 16-bit image stays dark
      hi = 65535.0
    elif mode == "F":
      hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0 if arr.max(initial=0) <= 255.0 else 65535.0
    else:  # 32-bit integers: guess 8- or 16-bit data from the values
      hi = 255.0 if arr.max(initial=0) <= 255 else 65535.0
    note(f"{mode} ({'16/32-bit' if mode != 'F' else 'float'}) rescaled to 8-bit RGB")
    arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
    note(f"{mode} with alpha composited on white")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  note(f"{mode} converted to RGB")
  return img.convert("RGB")


def read_image(source: str | pathlib.Path | bytes, name: str = "", report: ImportReport | None = None,
               min_side: int = 24) -> np.ndarray:
  """Decodes a photo file (or its bytes) to uint8 (H, W, 3) RGB, applying EXIF orientation.

  Args:
    source: path or encoded bytes.
    name: how the file is called in messages.
    report: conversions are counted there (skips are the caller's business: this raises).
    min_side: images whose shorter side is below this raise `SkipImage`.

  Raises:
    SkipImage: unreadable, truncated, too small or too large; the message is the reason.
  """
  name = name or str(source)[:80]

  def note(reason):
    if report is not None:
      report.convert(name, reason)

  try:
    data = source if isinstance(source, bytes) else pathlib.Path(source).read_bytes()
    with warnings.catch_warnings():  # PIL only warns up to twice its limit; a face photo never comes near it
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise SkipImage(f"too large: {e.args[0].split(',')[0]} (PIL's decompression-bomb limit); a face photo needs far "
                    "fewer pixels: shrink it first") from e
  except (OSError, SyntaxError, ValueError) as e:
    raise SkipImage(f"unreadable: {type(e).__name__}: {e}") from e
  try:
    with img:
      img.load()
      orientation = img.getexif().get(0x0112, 1)
      if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        note(f"EXIF orientation {orientation} applied")
      img = _to_rgb(img, note)
      arr = np.asarray(img, np.uint8)
  except SkipImage:
    raise
  except Image.DecompressionBombError as e:  # some formats learn their size only while decoding
    raise SkipImage(f"too large: {e.args[0].split(',')[0]} (PIL's decompression-bomb limit)") from e
  except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "corrupt"
    raise SkipImage(f"unreadable: {type(e).__name__}: {e}") from e
  if min(arr.shape[:2]) < min_side:
    raise SkipImage(f"too small: {arr.shape[1]}x{arr.shape[0]} < {min_side} px")
  return arr


def list_images(folder: str | pathlib.Path) -> list[pathlib.Path]:
  """Image files under `folder` (recursive, sorted by relative path), by extension."""
  folder = pathlib.Path(folder)
  return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to `size` x `size` (Lanczos; box-filtered when shrinking a lot)."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = Image.fromarray(image[top:top + s, left:left + s])
  if s != size:
    if s >= 2 * size:
      img = img.reduce(s // size)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(img, np.uint8)


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> uint8, rounding to nearest."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def uint8_to_minus1_1(images):
  """uint8 RGB pixels -> float32 in [-1, 1]: `p / 127.5 - 1`.

  A JAX array (also a traced one, inside `jit`) stays a JAX array; anything else becomes a numpy array.
  """
  if isinstance(images, jax.Array):
    return images.astype(np.float32) / 127.5 - 1.0
  return np.asarray(images, np.float32) / 127.5 - 1.0


def save_image_grid(path: os.PathLike[str], columns: list[np.ndarray]) -> None:
  """One row per image, one column per array of `columns` (each `(N, H, W, 3)` in [-1, 1]); written atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  rows = [np.concatenate([to_uint8(c[i]) for c in columns], axis=1) for i in range(columns[0].shape[0])]
  tmp = path.with_suffix(".tmp.png")
  Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
  os.replace(tmp, path)
