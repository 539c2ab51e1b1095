"""Evaluating metric networks: fixed-size chunks (one compilation, last chunk padded), at full float32 precision."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np


def map_in_batches(fn: Callable[..., jax.Array], batch_size: int, *arrays: np.ndarray) -> np.ndarray:
  """`fn(*chunks)` over leading-axis chunks of `batch_size`, concatenated.

  The last chunk is zero-padded to `batch_size` (and the padding dropped from the output), so a jitted `fn` compiles
  once per input shape rather than once more for the remainder. `fn` must treat batch rows independently.

  Args:
    fn: maps arrays [B, ...] to an array [B, ...].
    batch_size: rows per call; capped at the number of rows.
    *arrays: inputs with equal leading size N.

  Returns:
    numpy [N, ...].
  """
  n = arrays[0].shape[0]
  if any(a.shape[0] != n for a in arrays):
    raise ValueError(f"inputs differ in batch size: {[a.shape for a in arrays]}")
  b = max(1, min(batch_size, n))
  out = []
  for start in range(0, n, b):
    chunk = [np.asarray(a[start:start + b]) for a in arrays]
    pad = b - chunk[0].shape[0]
    if pad:
      chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
    out.append(np.asarray(fn(*chunk))[:b - pad])
  return np.concatenate(out)


def full_precision(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn` traced under `jax.default_matmul_precision("highest")`.

  On GPUs/TPUs XLA otherwise may run float32 convolutions and matmuls in TF32 / bfloat16 passes; metric values (LPIPS,
  FID features) should not depend on the accelerator, so the metric networks always use full float32.
  """
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped
