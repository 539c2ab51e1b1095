"""Pixel-space image quality: L1 and MSE on the [0, 1] scale.

Inputs are float NHWC batches in [-1, 1] (the model convention). Both are mapped to [0, 1] by `u = (x + 1) / 2`
before the error is taken, so the numbers are comparable with the paper's Table VI (L1 0.0357, MSE 0.0028 there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _to_unit(x: jax.Array) -> jax.Array:
  return (jnp.asarray(x, jnp.float32) + 1.0) * 0.5


def _check_pair(x: jax.Array, y: jax.Array) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"expected two NHWC batches of the same shape, got {x.shape} and {y.shape}")


@jax.jit
def l1_per_image(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute error per image on the [0, 1] scale.

  Args:
    x: float [N, H, W, C] in [-1, 1].
    y: float [N, H, W, C] in [-1, 1].

  Returns:
    float32 [N]: `mean_{h,w,c} |u(x) - u(y)|` with `u(v) = (v + 1) / 2`, i.e. half the [-1, 1] L1.
  """
  _check_pair(x, y)
  return jnp.mean(jnp.abs(_to_unit(x) - _to_unit(y)), axis=(1, 2, 3))


@jax.jit
def mse_per_image(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error per image on the [0, 1] scale.

  Args:
    x: float [N, H, W, C] in [-1, 1].
    y: float [N, H, W, C] in [-1, 1].

  Returns:
    float32 [N]: `mean_{h,w,c} (u(x) - u(y))^2`, a quarter of the [-1, 1] MSE.
  """
  _check_pair(x, y)
  return jnp.mean(jnp.square(_to_unit(x) - _to_unit(y)), axis=(1, 2, 3))


def l1(x: jax.Array, y: jax.Array) -> float:
  """Mean over the batch of `l1_per_image`."""
  return float(jnp.mean(l1_per_image(x, y)))


def mse(x: jax.Array, y: jax.Array) -> float:
  """Mean over the batch of `mse_per_image`."""
  return float(jnp.mean(mse_per_image(x, y)))
