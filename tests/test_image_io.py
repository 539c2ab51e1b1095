"""`read_image`, the one photo reader every command uses: bit depths and EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from erasablemask_jax import image_io


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("peak", [200, 65535])  # a dark 16-bit image (every value < 256) stays dark
def test_16_bit_png_is_scaled_from_its_depth(peak):
  values = np.linspace(0, peak, 32 * 32).round().astype(np.uint16).reshape(32, 32)
  report = image_io.ImportReport()
  out = image_io.read_image(_png(values), "sixteen.png", report)
  assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
  np.testing.assert_array_equal(out[..., 0], np.round(values / 257.0).astype(np.uint8))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert any("16" in reason for reason in report.converted)


@pytest.mark.parametrize("orientation, undo", [(3, lambda a: np.rot90(a, 2)), (6, np.rot90),
                                               (8, lambda a: np.rot90(a, -1))])
def test_exif_orientation_is_applied(orientation, undo):
  upright = np.zeros((40, 24, 3), np.uint8)
  upright[:10] = 255  # white top band
  upright[:, :6, 1] = 200  # green left band
  stored = undo(upright)  # what a camera stores for this tag
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="PNG", exif=exif)
  np.testing.assert_array_equal(image_io.read_image(buf.getvalue(), min_side=1), upright)


def _png_header_claiming(side: int) -> bytes:
  """A PNG whose header claims side x side 1-bit pixels, with almost no data: a decompression bomb's shape."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_from_its_header():
  with pytest.raises(image_io.SkipImage, match=r"too large: Image size \(3600000000 pixels\) exceeds limit of \d+ "
                                             r"pixels \(PIL's decompression-bomb limit\)"):
    image_io.read_image(_png_header_claiming(60000), "bomb.png")


def test_an_image_over_the_limit_but_under_twice_it_is_skipped_too(monkeypatch):
  """PIL only warns between its limit and twice it; decoding such a file would still take gigabytes."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  buf = io.BytesIO()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="PNG")  # 1600 pixels: between 1000 and 2000
  with pytest.raises(image_io.SkipImage, match="too large: Image size \\(1600 pixels\\) exceeds limit of 1000 pixels"):
    image_io.read_image(buf.getvalue(), "big.png")
