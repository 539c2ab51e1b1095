"""Timing several computations side by side on a shared machine: rounds in which every one of them runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def rotated_rounds(fns: dict[str, Callable[[], Any]], rounds: int, calls: int,
                   best: bool = False) -> dict[str, list[float]]:
  """Seconds per call of every fn (already compiled and warmed) in each of `rounds` rounds.

  Every fn is timed in every round, in an order rotated by one per round (two fns alternate), so that a slow patch of
  the machine hits them alike. A round's figure is the mean over `calls` calls, or with `best` the fastest of them.
  """
  names = list(fns)
  out = {n: [] for n in names}
  for r in range(rounds):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      times = []
      for _ in range(calls):
        t = time.perf_counter()
        fns[n]()
        times.append(time.perf_counter() - t)
      out[n].append(min(times) if best else sum(times) / calls)
  return out
