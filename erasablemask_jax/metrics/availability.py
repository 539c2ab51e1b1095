"""A metric value that could not be computed, with the reason; never replaced by a made-up number."""

from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True)
class Unavailable:
  """Marks a metric that was not computed.

  Attributes:
    reason: what was missing and how to supply it, e.g. "no LPIPS weights: pass --lpips-weights FILE".
  """
  reason: str

  def __str__(self) -> str:
    return f"n/a ({self.reason})"


MetricValue = Union[float, Unavailable]


def format_metric(value: MetricValue, fmt: str = ".4f") -> str:
  """Formats a metric for a report table: the number, or `n/a (reason)` when it is `Unavailable`."""
  if isinstance(value, Unavailable):
    return str(value)
  return format(float(value), fmt)


def to_json(value: MetricValue) -> float | dict[str, str]:
  """JSON form: the float, or `{"unavailable": reason}`."""
  if isinstance(value, Unavailable):
    return {"unavailable": value.reason}
  return float(value)


def from_json(value: float | dict[str, str]) -> MetricValue:
  """The reverse of `to_json`."""
  if isinstance(value, dict):
    return Unavailable(value["unavailable"])
  return float(value)
