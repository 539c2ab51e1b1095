"""Argument types the commands share: counts and sizes that must be positive are refused by argparse (exit status 2)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
  """`int(text)`, which must be >= 1 (a batch size, an image side, a step count)."""
  return _number(text, int, 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
  return _number(text, int, 0, "a whole number >= 0")


def positive_float(text: str) -> float:
  value = _number(text, float, 0.0, "a number > 0")
  if value == 0:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
  return value


def non_negative_float(text: str) -> float:
  return _number(text, float, 0.0, "a number >= 0")


def _number(text: str, kind, low, wanted: str):
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
  if not value >= low:  # also refuses NaN
    raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
  return value
