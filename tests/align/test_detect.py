"""MTCNN detection pieces (resampling, NMS, alignment maths) and landmarks against the shared assets' records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

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


# A subset keeps the runtime small; `benchmarks/align_accuracy.py` reports the full set.
_SUBSET = {
    "celeba_wild_identities": ["000114.jpg", "000131.jpg", "001085.jpg", "004074.jpg", "012589.jpg", "019993.jpg"],
    "deepface_pairs": ["img10.jpg", "img12.jpg", "img3.jpg", "img20.jpg"],
}


@pytest.mark.assets
def test_landmarks_close_to_recorded(assets_dir):
  errors = []
  for folder, names in _SUBSET.items():
    meta = json.loads((assets_dir / "images/derived_aligned112" / folder / "alignment_meta.json").read_text())
    for name in names:
      image = np.asarray(Image.open(assets_dir / "images" / folder / name).convert("RGB"))
      det = detect.detect_faces(image)
      i = detect.select_face(det, image.shape[:2])
      assert i is not None, f"no face found in {folder}/{name}; the assets record one"
      errors.append(np.linalg.norm(det.landmarks[i] - np.asarray(meta[name]["landmarks5"]), axis=1).mean())
  assert np.mean(errors) < 3.0, errors
