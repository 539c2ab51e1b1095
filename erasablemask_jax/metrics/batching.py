"""Evaluating a jitted function over a large batch in fixed-size chunks (one compilation, last chunk padded)."""

from __future__ import annotations

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
