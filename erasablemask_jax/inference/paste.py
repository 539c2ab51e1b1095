"""Faces in and out of a whole photo: the run's aligned crop of each face, and the model's change put back at the
photo's own resolution.

A face is a 2x3 similarity `M` (Umeyama fit of its five MTCNN landmarks onto the run's template at the model's side S,
`align.warp`), mapping photo pixel centres `p = (x, y)` to crop coordinates `q = M [p; 1]`. Everything here is a pure
function of the photo (uint8 (H, W, 3)) and the matrices, so protect and erase run the very same code.

In (`face_crop`): `crop(q) = photo(M^-1 q)` sampled bilinearly. A 12-megapixel face is 10-20 times the model's side,
and bilinear taps that far apart alias; so when the scale `s = sqrt(|det M_lin|)` is below 1/2, the face's region is
first box-averaged by `k = floor(1/s)` (each k x k block to its mean, the block centre at `k q + (k - 1)/2`) and `M`
composed with that reduction, leaving a bilinear warp at scale `s k` in (1/2, 1], as our aligner's crops see.

Out (`paste_changes`): each face contributes its model-resolution change `d_i = y_i - crop_i` (protect:
`y = x_adv`; erase: `y = x_rec`), in 0..255 units, and the photo becomes

  out(p) = photo(p) + sum_i w_i(p) d_i(M_i p) / max(1, sum_i w_i(p))                                          (1)

with `d_i(q)` sampled bilinearly (edge-clamped) and, where the photo is coarser than the crop (`s > 1`), first low-passed
with a Gaussian of sigma `s / 2` so that it is not aliased. `w_i(p) = m(M_i p)` is a feathered mask over the aligned
square: `m(q) = smooth(a_x / f) smooth(a_y / f)` where `a_x, a_y` are the distances of q to the crop's nearest
vertical and horizontal edge as fractions of S, `f = FEATHER` and `smooth(t) = 3t^2 - 2t^3` on [0, 1] (1 beyond):
1 over the face, falling smoothly to 0 at the crop's border, so no seam is drawn. Pixels with `sum_i w_i = 0` (outside
every face's square) are copied, not recomputed: they are the photo's bytes exactly. Overlapping faces are averaged
by their weights, in any order.

Why the change and not the face: the model sees the photo at S x S (64 or 128 px), far below a photo's face. Pasting
`x_adv` would replace the face by an upsampled low-resolution one (skin, hair and eyes lose their detail). Adding the
change keeps every frequency the model cannot see and alters exactly the band it can: taking the face back to the
model's resolution through the same crop gives `crop(out) ~ crop + d = x_adv` (up to the resampling's blur of `d`),
which is the image the attack was optimised for and the one R was trained to restore. The change includes G's
reconstruction error at S as well as the edit and the perturbation; subtracting a reconstruction `G(x, att_a)` instead
would leave that error out of the photo, but then the photo at S would no longer be `x_adv` and R would see an input
unlike its training. Erase adds R's change the same way, so the restored photo is the protected one plus
`x_rec - x_adv` at S: the original plus `x_rec - x` where the model works, the original's own pixels elsewhere.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from erasablemask_jax.align import warp

FEATHER = 0.12  # width of the mask's ramp, as a fraction of the crop side


def face_transform(landmarks: np.ndarray, size: int, template: str) -> np.ndarray:
  """The (2, 3) similarity taking the five landmarks (5, 2) onto `template` at `size` (`align.warp`)."""
  return warp.similarity_transform(np.asarray(landmarks, np.float64), warp.template(template, size))


def _scale(matrix: np.ndarray) -> float:
  return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix, np.float64)[:, :2]))))


def crop_region(matrix: np.ndarray, size: int, image_hw: tuple[int, int], margin: int = 2
                ) -> tuple[int, int, int, int]:
  """`(top, left, bottom, right)` (exclusive) of the photo pixels whose crop coordinates can fall inside the S x S
  crop (its corners mapped back by `M^-1`), widened by `margin` and clipped to the photo; empty when outside."""
  inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
  corners = np.array([[-0.5, -0.5, 1], [size - 0.5, -0.5, 1], [-0.5, size - 0.5, 1], [size - 0.5, size - 0.5, 1]])
  pts = corners @ inv.T
  h, w = image_hw
  left, top = np.floor(pts.min(0)).astype(int) - margin
  right, bottom = np.ceil(pts.max(0)).astype(int) + margin + 1
  top, left = max(0, top), max(0, left)
  bottom, right = min(h, bottom), min(w, right)
  return top, left, max(top, bottom), max(left, right)


def face_crop(image: np.ndarray, matrix: np.ndarray, size: int, border: str = "reflect") -> np.ndarray:
  """The S x S aligned crop of one face, uint8 (module docstring: box-averaged first when `s < 1/2`).

  Args:
    image: uint8 (H, W, 3) photo.
    matrix: (2, 3) photo -> crop map.
    size: the crop side S.
    border: `align.warp.warp_affine`'s mode for crop pixels beyond the photo ('reflect', as the loose training crops).
  """
  matrix = np.asarray(matrix, np.float64)
  k = max(1, int(np.floor(1.0 / _scale(matrix)))) if _scale(matrix) < 0.5 else 1
  # A margin of 2k photo pixels keeps a whole reduced pixel beyond every bilinear tap after trimming to k-blocks.
  top, left, bottom, right = crop_region(matrix, size, image.shape[:2], margin=2 * k + 2)
  bottom = top + max(k, (bottom - top) // k * k)
  right = left + max(k, (right - left) // k * k)
  region = image[top:bottom, left:right].astype(np.float32)
  if region.shape[0] < k or region.shape[1] < k:  # the face lies beyond the photo: sample the photo itself
    region, k, top, left = image.astype(np.float32), 1, 0, 0
  h, w = region.shape[0] // k, region.shape[1] // k
  region = region[:h * k, :w * k].reshape(h, k, w, k, 3).mean(axis=(1, 3))
  # photo p = k q + (left, top) + (k - 1) / 2 for a reduced pixel q; compose M with that map.
  lin = matrix[:, :2]
  shift = np.array([left, top], np.float64) + (k - 1) / 2.0
  reduced = np.concatenate([lin * k, (lin @ shift + matrix[:, 2])[:, None]], axis=1)
  return warp.warp_affine(region, reduced, (size, size), border)


def smooth_ramp(t: np.ndarray) -> np.ndarray:
  """`3t^2 - 2t^3` on t clipped to [0, 1]."""
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def feather_weight(u: np.ndarray, v: np.ndarray, size: int, feather: float = FEATHER) -> np.ndarray:
  """`m(q)` of the module docstring at crop coordinates (u, v): 1 inside, 0 on and beyond the crop's border."""
  ax = np.minimum(u + 0.5, size - 0.5 - u) / size
  ay = np.minimum(v + 0.5, size - 0.5 - v) / size
  return smooth_ramp(ax / feather) * smooth_ramp(ay / feather)


def _face_coords(matrix: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  top, left, bottom, right = box
  ys, xs = np.mgrid[top:bottom, left:right].astype(np.float64)
  u = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
  v = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
  return u, v


def face_weights(matrices: np.ndarray, size: int, image_hw: tuple[int, int], feather: float = FEATHER
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """`sum_i w_i` over the union of the faces' regions: ((b - t, r - l) float32, (t, l, b, r)); all-zero box if none."""
  boxes = [crop_region(m, size, image_hw) for m in matrices]
  boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
  if not boxes:
    return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
  union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
  total = np.zeros((union[2] - union[0], union[3] - union[1]), np.float32)
  for m, b in zip(matrices, [crop_region(m, size, image_hw) for m in matrices]):
    if b[2] <= b[0] or b[3] <= b[1]:
      continue
    u, v = _face_coords(np.asarray(m, np.float64), b)
    total[b[0] - union[0]:b[2] - union[0], b[1] - union[1]:b[3] - union[1]] += feather_weight(u, v, size, feather)
  return total, union


def face_region_mask(matrices: np.ndarray, size: int, image_hw: tuple[int, int], feather: float = FEATHER
                     ) -> np.ndarray:
  """bool (H, W): the pixels `paste_changes` may alter (`sum_i w_i > 0`); everything else is the photo's own."""
  mask = np.zeros(image_hw, bool)
  total, (t, l, b, r) = face_weights(matrices, size, image_hw, feather)
  mask[t:b, l:r] = total > 0
  return mask


def paste_changes(image: np.ndarray, changes: np.ndarray, matrices: np.ndarray, feather: float = FEATHER
                  ) -> np.ndarray:
  """Eq. (1): the photo with each face's change added through its feathered mask; uint8 (H, W, 3).

  Args:
    image: uint8 (H, W, 3) photo.
    changes: float (N, S, S, 3) per-face changes in 0..255 units (`y - crop`).
    matrices: (N, 2, 3) photo -> crop maps.
    feather: the mask's ramp width (fraction of S).
  """
  image = np.asarray(image)
  changes = np.asarray(changes, np.float32)
  if len(changes) == 0:
    return image.copy()
  size = changes.shape[1]
  total, union = face_weights(matrices, size, image.shape[:2], feather)
  t0, l0, b0, r0 = union
  if b0 <= t0 or r0 <= l0:
    return image.copy()
  acc = np.zeros((b0 - t0, r0 - l0, 3), np.float32)
  for m, d in zip(np.asarray(matrices, np.float64), changes):
    t, l, b, r = crop_region(m, size, image.shape[:2])
    if b <= t or r <= l:
      continue
    s = _scale(m)
    if s > 1.0:  # the photo samples the change more coarsely than S: low-pass it first
      d = scipy.ndimage.gaussian_filter(d, sigma=(s / 2, s / 2, 0), mode="nearest")
    u, v = _face_coords(m, (t, l, b, r))
    wgt = feather_weight(u, v, size, feather)
    sampled = np.stack([scipy.ndimage.map_coordinates(d[..., c], [v, u], order=1, mode="nearest")
                        for c in range(d.shape[-1])], axis=-1)
    acc[t - t0:b - t0, l - l0:r - l0] += wgt[..., None] * sampled
  out = image.copy()
  inside = total > 0
  patch = out[t0:b0, l0:r0]
  moved = patch.astype(np.float32) + acc / np.maximum(1.0, total)[..., None]
  patch[inside] = np.clip(np.round(moved[inside]), 0, 255).astype(np.uint8)
  return out


def rescale_transform(matrix: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
  """`M` for the same photo resized from `from_hw` to `to_hw` (a sharing site's downscale): with pixel centres
  `p' = (p + 1/2) r - 1/2` and `r` the mean of the two axes' ratios, `M' [p'; 1] = M [(p' + 1/2) / r - 1/2; 1]`."""
  matrix = np.asarray(matrix, np.float64)
  r = 0.5 * (to_hw[0] / from_hw[0] + to_hw[1] / from_hw[1])
  lin = matrix[:, :2] / r
  return np.concatenate([lin, (lin @ np.full(2, 0.5) - matrix[:, :2] @ np.full(2, 0.5) + matrix[:, 2])[:, None]],
                        axis=1)
