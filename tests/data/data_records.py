"""In-memory records for testing the grain pipeline without preparing a tfds builder."""

from __future__ import annotations

import numpy as np


class Records:
  """A random-access source over arrays `{"image": (N, ...), "att": (N, 13), "identity": (N,)}`, one record a row."""

  def __init__(self, arrays):
    self.arrays = {k: np.asarray(arrays[k]) for k in ("image", "att", "identity")}

  def __len__(self) -> int:
    return len(self.arrays["image"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __repr__(self) -> str:  # grain records the source's repr in the iterator state
    return f"Records(n={len(self)})"
