"""Five-point similarity alignment: face templates, the Umeyama fit, and the bilinear warp.

Templates are five (x, y) points in the output crop, in the order left eye, right eye, nose tip, left mouth corner,
right mouth corner (viewer's left first), with pixel centres at integer coordinates (OpenCV's convention).

- `arcface`: the standard ArcFace 112x112 template (InsightFace), scaled by size / 112. The crop recognition models
  expect (tight: eyes at 46% of the height, eye distance 31% of the side).
- `loose`: a generation crop close to FFHQ / CelebA-HQ framing: the ArcFace points shrunk by 0.8 about the eye
  midpoint and placed with the eye midpoint at (0.5, 0.42) of the side, so the whole head, hair and some background
  are inside (eye distance 25% of the side, as FFHQ's `2 x eye distance = half the crop` rule). Used for 256x256 data.
"""

from __future__ import annotations

import numpy as np

ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)

LOOSE_SHRINK = 0.8
LOOSE_EYE_CENTRE = (0.5, 0.42)

TEMPLATES = ("arcface", "loose")


def template(name: str, size: int) -> np.ndarray:
  """The five template points (5, 2) for a `size` x `size` crop; `name` in TEMPLATES."""
  unit = ARCFACE_112 / 112.0
  if name == "arcface":
    pts = unit
  elif name == "loose":
    eye_mid = unit[:2].mean(axis=0)
    pts = (unit - eye_mid) * LOOSE_SHRINK + np.asarray(LOOSE_EYE_CENTRE)
  else:
    raise ValueError(f"unknown face template {name!r}; choose one of {TEMPLATES}")
  # The ArcFace numbers are in 112-pixel coordinates; scale about the origin as InsightFace does for other sizes.
  return pts * size


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity (rotation, uniform scale, translation) mapping `src` points onto `dst` (Umeyama 1991).

  With centred points a = src - mean(src), b = dst - mean(dst) and the SVD `b^T a / n = U S V^T`, the rotation is
  `R = U D V^T` (D flips the last axis when det(U V^T) < 0), the scale `c = tr(S D) / var(a)` and the translation
  `t = mean(dst) - c R mean(src)`.

  Returns:
    (2, 3) float64 matrix M with `dst ~= M @ [x, y, 1]`.
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  a, b = src - mu_s, dst - mu_d
  cov = b.T @ a / len(src)
  u, s, vt = np.linalg.svd(cov)
  d = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    d[-1] = -1
  rot = u @ np.diag(d) @ vt
  scale = (s * d).sum() / a.var(0).sum()
  m = np.zeros((2, 3))
  m[:, :2] = scale * rot
  m[:, 2] = mu_d - scale * rot @ mu_s
  return m


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border: str = "constant") -> np.ndarray:
  """Bilinear warp: `out[y, x] = image(M^-1 [x, y, 1])` for a (2, 3) forward matrix M (OpenCV `warpAffine` semantics).

  Args:
    image: uint8 (H, W, C).
    matrix: (2, 3) map from input to output pixel coordinates.
    size: output (height, width).
    border: 'constant' (zeros, as the assets' crops), 'edge' (replicate) or 'reflect' (mirror without repeating the
      edge pixel) for samples outside the image.

  Returns:
    uint8 (height, width, C).
  """
  h_out, w_out = size
  full = np.vstack([matrix, [0, 0, 1]])
  inv = np.linalg.inv(full)[:2]
  ys, xs = np.mgrid[0:h_out, 0:w_out].astype(np.float64)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  h, w = image.shape[:2]
  x0 = np.floor(sx).astype(np.int64)
  y0 = np.floor(sy).astype(np.int64)
  fx = (sx - x0)[..., None]
  fy = (sy - y0)[..., None]
  img = image.astype(np.float32)

  def tap(yy, xx):
    if border == "constant":
      inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
      return np.where(inside, img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)
    if border == "edge":
      return img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    if border == "reflect":
      return img[_reflect(yy, h), _reflect(xx, w)]
    raise ValueError(f"unknown border mode {border!r}; use 'constant', 'edge' or 'reflect'")

  out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
         + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
  """Mirror indices into [0, n) without repeating the edge (OpenCV BORDER_REFLECT_101)."""
  if n == 1:
    return np.zeros_like(i)
  period = 2 * (n - 1)
  i = np.mod(i, period)
  return np.where(i < n, i, period - i)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int, template_name: str = "arcface",
               border: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Warps `image` so that `landmarks` (5, 2) land on the template; returns (crop uint8 (size, size, 3), M (2, 3)).

  `border` defaults to 'constant' for the arcface template and 'reflect' for the loose one (a black frame around a
  generation crop would be learned as content).
  """
  if border is None:
    border = "constant" if template_name == "arcface" else "reflect"
  m = similarity_transform(landmarks, template(template_name, size))
  return warp_affine(image, m, (size, size), border), m
