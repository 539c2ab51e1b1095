"""`inference.paste`: crops of whole photos and the model's change put back, on synthetic photos (no network)."""

import numpy as np
import pytest

from erasablemask_jax.align import warp
from erasablemask_jax.inference import paste

SIZE = 32


def _ramp(h, w):
  """A photo whose value is an affine function of the pixel centre (box averages and bilinear taps are exact)."""
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  return np.stack([0.1 * xs + 20, 0.08 * ys + 30, 0.05 * (xs + ys) + 10], axis=-1)


def _transform(centre, side, angle=0.2):
  """A photo -> crop similarity whose crop covers a `side`-pixel square around `centre`, rotated by `angle`."""
  s = SIZE / side
  c, n = np.cos(angle) * s, np.sin(angle) * s
  lin = np.array([[c, -n], [n, c]])
  t = np.array([SIZE / 2 - 0.5, SIZE / 2 - 0.5]) - lin @ np.asarray(centre, np.float64)
  return np.concatenate([lin, t[:, None]], axis=1)


def _expected_crop(photo, matrix):
  inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
  ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
  px = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  py = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  return np.stack([0.1 * px + 20, 0.08 * py + 30, 0.05 * (px + py) + 10], axis=-1)


@pytest.mark.parametrize("side", [40, 200, 700])  # k = 1 (no reduction), 6 and 21: the box-averaged path
def test_face_crop_samples_the_photo_where_the_transform_says(side):
  photo = _ramp(1300, 1300)
  m = _transform((650, 640), side)
  crop = paste.face_crop(np.round(photo).astype(np.uint8), m, SIZE)
  np.testing.assert_allclose(crop, _expected_crop(photo, m), atol=1.01)


def test_nothing_outside_the_faces_changes_and_the_centre_gets_the_whole_change():
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  m = [_transform((150, 120), 120), _transform((300, 180), 90, -0.4)]
  change = np.full((2, SIZE, SIZE, 3), 40.0, np.float32)
  out = paste.paste_changes(photo, change, np.stack(m))
  region = paste.face_region_mask(np.stack(m), SIZE, photo.shape[:2])
  assert out.shape == photo.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out[~region], photo[~region])
  assert region.mean() < 0.5 and region[120, 150] and region[180, 300]
  centre = np.clip(photo[120, 150].astype(int) + 40, 0, 255)
  np.testing.assert_array_equal(out[120, 150], centre)


def test_the_feather_has_no_seam():
  photo = np.full((200, 200, 3), 100, np.uint8)
  m = _transform((100, 100), 120, 0.0)
  out = paste.paste_changes(photo, np.full((1, SIZE, SIZE, 3), 60.0, np.float32), m[None]).astype(int)
  row = out[100, :, 0]
  assert row[0] == 100 and row[100] == 160
  assert np.abs(np.diff(row)).max() <= 6  # a ramp over ~14 px, not a 60-level step


def test_zero_change_and_no_face_give_the_photo_back():
  photo = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
  m = _transform((40, 30), 50)
  np.testing.assert_array_equal(paste.paste_changes(photo, np.zeros((1, SIZE, SIZE, 3)), m[None]), photo)
  np.testing.assert_array_equal(paste.paste_changes(photo, np.zeros((0, SIZE, SIZE, 3)), np.zeros((0, 2, 3))), photo)


def test_a_smooth_change_comes_back_through_the_crop():
  """crop(paste(photo, d)) ~ crop(photo) + d where the mask is 1: what the model sees of the protected photo."""
  photo = np.round(_ramp(600, 600)).astype(np.uint8)
  m = _transform((300, 300), 400)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  d = np.repeat((10 * np.sin(xx / 5.0) + 8 * np.cos(yy / 7.0))[None, ..., None], 3, axis=-1).astype(np.float32)
  got = paste.face_crop(paste.paste_changes(photo, d, m[None]), m, SIZE).astype(float)
  want = paste.face_crop(photo, m, SIZE).astype(float) + d[0]
  inner = slice(8, SIZE - 8)
  assert np.abs(got - want)[inner, inner].mean() < 1.5


def test_rescaled_transform_follows_a_resized_photo():
  m = _transform((300, 200), 150)
  m2 = paste.rescale_transform(m, (600, 400), (300, 200))
  p = np.array([123.0, 456.0])
  np.testing.assert_allclose(m2 @ np.r_[(p + 0.5) * 0.5 - 0.5, 1], m @ np.r_[p, 1], atol=1e-9)


def test_face_transform_is_the_template_fit():
  pts = warp.template("loose", 64) * 3 + 11
  m = paste.face_transform(pts, 64, "loose")
  np.testing.assert_allclose(np.c_[pts, np.ones(5)] @ m.T, warp.template("loose", 64), atol=1e-6)
