"""Robustness transforms: pure functions of (images, rng, parameters) on float NHWC images in [-1, 1].

Every transform takes `rng` (a `jax.random` key) even when it is deterministic, so all of them fit the noise pool's
`(images, rng) -> images` signature; all are jit/vmap/grad-safe (no host callbacks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RESIZE_METHODS = ("linear", "cubic", "lanczos3", "nearest")


def identity(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Returns images unchanged (the pool's "no distortion" member)."""
  del rng
  return images


def gaussian_noise(images: jax.Array, rng: jax.Array, variance: float = 0.003, *, clip: bool = True) -> jax.Array:
  """Additive white Gaussian noise with `variance` measured on the [0, 1] scale.

  On [-1, 1] images (x = 2 u - 1 for u in [0, 1]) this is `x + 2 sqrt(variance) eps`, eps ~ N(0, 1) per value.

  Args:
    images: float (N, H, W, C) in [-1, 1].
    rng: PRNG key.
    variance: noise variance on the [0, 1] scale (0.003 in the paper's evaluation).
    clip: clip the result to [-1, 1], as saving the image would.

  Returns:
    Noisy images, same shape and dtype.
  """
  noise = jax.random.normal(rng, images.shape, images.dtype)
  out = images + 2.0 * jnp.sqrt(jnp.asarray(variance, images.dtype)) * noise
  return jnp.clip(out, -1.0, 1.0) if clip else out


def _resize(images: jax.Array, height: int, width: int, method: str, antialias: bool) -> jax.Array:
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize method must be one of {RESIZE_METHODS}; got {method!r}")
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, height, width, c), method=method, antialias=antialias)


def resize_down_up(images: jax.Array, rng: jax.Array, factor: float = 0.5, *, method: str = "linear",
                   antialias: bool = True) -> jax.Array:
  """Resize by `factor` (antialiased when shrinking) and back to the input size.

  The intermediate size is `max(1, round(H * factor)) x max(1, round(W * factor))`; "linear" with antialias matches
  Pillow's BILINEAR resize (a triangle filter widened by 1/factor when shrinking, half-pixel centres).

  Args:
    images: float (N, H, W, C).
    rng: unused.
    factor: scale of the intermediate image, in (0, 1] for a downscale.
    method: jax.image.resize method.
    antialias: low-pass when shrinking (Pillow always does).

  Returns:
    Images of the input shape.
  """
  del rng
  if factor <= 0:
    raise ValueError(f"resize factor must be > 0; got {factor}")
  _, h, w, _ = images.shape
  small = _resize(images, max(1, round(h * factor)), max(1, round(w * factor)), method, antialias)
  return _resize(small, h, w, method, antialias)


def median_filter(images: jax.Array, rng: jax.Array, size: int = 5) -> jax.Array:
  """k x k median over each channel, edges mirrored as scipy.ndimage.median_filter(mode="reflect") does.

  out[n, i, j, c] = median{x[n, i + a, j + b, c] : |a|, |b| <= k // 2}, with x mirrored about the edge
  (d c b a | a b c d). The median is the middle element of the sorted k^2 window (k odd), so it is one of the input
  values and the gradient flows to that element.

  Args:
    images: float (N, H, W, C).
    rng: unused.
    size: odd window size k.

  Returns:
    Filtered images, same shape.
  """
  del rng
  if size < 1 or size % 2 == 0:
    raise ValueError(f"median filter size must be a positive odd integer; got {size}")
  r = size // 2
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
  windows = jnp.stack([padded[:, a:a + h, b:b + w] for a in range(size) for b in range(size)], axis=0)
  return jnp.sort(windows, axis=0)[size * size // 2]


def rotate(images: jax.Array, angles: jax.Array, *, fill: float = -1.0) -> jax.Array:
  """Rotate each image counter-clockwise by its angle (degrees) about the centre, bilinear, same size.

  Output pixel (i, j) samples the input at c + R ((i, j) - c), c = ((H - 1) / 2, (W - 1) / 2), with
  R = [[cos t, sin t], [-sin t, cos t]] in (row, column) coordinates: the convention of
  scipy.ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="grid-constant", cval=fill)
  (corners are blended with `fill` across the border, as "grid-constant" does; "constant" differs only there).

  Args:
    images: float (N, H, W, C).
    angles: (N,) or scalar angles in degrees.
    fill: value outside the input (-1: black on [-1, 1] images, as torchvision fills 0 on [0, 1]).

  Returns:
    Rotated images, same shape.
  """
  n, h, w, _ = images.shape
  theta = jnp.deg2rad(jnp.broadcast_to(jnp.asarray(angles, jnp.float32), (n,)))
  ii, jj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2,
                        jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2, indexing="ij")

  def one(image, t):
    cos, sin = jnp.cos(t), jnp.sin(t)
    coords = jnp.stack([cos * ii + sin * jj + (h - 1) / 2, -sin * ii + cos * jj + (w - 1) / 2])

    def channel(plane):
      return jax.scipy.ndimage.map_coordinates(plane, list(coords), order=1, mode="constant", cval=fill)

    return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)

  return jax.vmap(one)(images, theta)


def random_rotation(images: jax.Array, rng: jax.Array, max_degrees: float = 30.0, *, fill: float = -1.0) -> jax.Array:
  """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees] (see `rotate`)."""
  angles = jax.random.uniform(rng, (images.shape[0],), minval=-max_degrees, maxval=max_degrees)
  return rotate(images, angles, fill=fill)


def center_crop_resize(images: jax.Array, rng: jax.Array, size: float = 224, *, method: str = "linear",
                       antialias: bool = True) -> jax.Array:
  """Crop the central `size` x `size` region and resize it back to the input size.

  Args:
    images: float (N, H, W, C) with H, W >= the crop size.
    rng: unused.
    size: crop side in pixels if > 1, else a fraction of each side (e.g. 0.875).
    method: jax.image.resize method for the resize back.
    antialias: passed to jax.image.resize.

  Returns:
    Images of the input shape.
  """
  del rng
  _, h, w, _ = images.shape
  ch, cw = (int(size), int(size)) if size > 1 else (max(1, round(h * size)), max(1, round(w * size)))
  if ch > h or cw > w or size <= 0:
    raise ValueError(f"center crop of {ch}x{cw} does not fit {h}x{w} images; use a smaller crop or a fraction <= 1")
  top, left = (h - ch) // 2, (w - cw) // 2
  return _resize(images[:, top:top + ch, left:left + cw], h, w, method, antialias)
