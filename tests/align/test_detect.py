"""MTCNN detection pieces (resampling, NMS, alignment maths) and landmarks against the shared assets' records."""

from __future__ import annotations

import numpy as np
import pytest

from erasablemask_jax.align import detect
from erasablemask_jax.align import warp


def test_area_resize_matches_adaptive_average_pooling():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).uniform(0, 255, (37, 53, 3)).astype(np.float32)
  for hw in [(24, 24), (10, 31), (37, 53), (5, 7), (48, 48)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=hw, mode="area")
    np.testing.assert_allclose(detect.area_resize(x, hw), want[0].numpy().transpose(1, 2, 0), atol=1e-3)


def test_nms_union_and_min():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
  # IoU(0, 1) = 81 / 119 = 0.68 > 0.5; the small box 3 overlaps box 0 by 16 / 100 only.
  assert detect.nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
  # 'min' divides by the smaller box: box 3 lies inside box 0, overlap 1.
  assert detect.nms(boxes, scores, 0.7, mode="min").tolist() == [3, 2]


def test_similarity_transform_recovers_a_known_map():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 100, (5, 2))
  angle, scale, shift = 0.3, 1.7, np.array([4.0, -9.0])
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  dst = scale * src @ rot.T + shift
  m = warp.similarity_transform(src, dst)
  np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
  np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_warp_puts_landmarks_on_template():
  """A synthetic image with dots at the landmarks: after warping, each dot sits at its template point."""
  img = np.zeros((300, 260, 3), np.uint8)
  marks = np.array([[90.0, 120.0], [160.0, 110.0], [130.0, 160.0], [100.0, 200.0], [165.0, 190.0]])
  for x, y in marks:
    img[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 255
  for name in warp.TEMPLATES:
    crop, m = warp.align_face(img, marks, 128, name, border="constant")
    mapped = np.c_[marks, np.ones(5)] @ m.T
    for (tx, ty), (mx, my) in zip(warp.template(name, 128), mapped):
      assert abs(tx - mx) < 6 and abs(ty - my) < 6  # least squares over 5 points: close, not exact
      y, x = int(round(my)), int(round(mx))
      assert crop[y, x].max() > 100


def test_detects_nothing_on_flat_image():
  assert len(detect.detect_faces(np.full((120, 100, 3), 128, np.uint8))) == 0


def test_continuous_crop_is_exact_area_average():
  """`resize_continuous` = brute-force area average: each pixel split into 10x10 sub-cells, a region on that grid."""
  img = np.random.default_rng(2).uniform(0, 255, (23, 31, 3))
  integral = detect.IntegralImage(img)
  fine = np.repeat(np.repeat(img, 10, axis=0), 10, axis=1)
  y0, y1, x0, x1, out = 2.3, 19.8, 4.1, 27.5, (5, 6)  # cell edges fall on the 0.1 sub-grid
  got = integral.resize_continuous(out, y0, y1, x0, x1)
  ys = np.linspace(y0 * 10, y1 * 10, out[0] + 1).round().astype(int)
  xs = np.linspace(x0 * 10, x1 * 10, out[1] + 1).round().astype(int)
  want = np.array([[fine[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean((0, 1)) for j in range(out[1])] for i in range(out[0])])
  np.testing.assert_allclose(got, want, atol=1e-3)
  # On integer bounds with an integer ratio it is the adaptive-average-pooling crop.
  np.testing.assert_allclose(integral.resize_continuous((4, 5), 3, 19, 6, 26), integral.resize((4, 5), 3, 19, 6, 26),
                             atol=1e-4)


def test_crop_modes():
  integral = detect.IntegralImage(np.random.default_rng(3).uniform(0, 255, (60, 80, 3)))
  boxes = np.array([[10.7, 5.2, 40.7, 35.2], [-20.0, -5.0, 30.0, 45.0], [90.0, 70.0, 120.0, 100.0]], np.float32)
  for mode in ("continuous", "facenet"):
    patches, ok = detect._crop_patches(integral, boxes, 24, mode)  # pylint: disable=protected-access
    assert ok.tolist() == [0, 1] and patches.shape == (2, 24, 24, 3)  # the third box lies outside the image
    assert np.abs(patches).max() <= 1.0
  with pytest.raises(ValueError, match="crop mode"):
    detect._crop_patches(integral, boxes, 24, "nearest")  # pylint: disable=protected-access
