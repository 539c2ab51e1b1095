"""Attribute vectors for protection: the target attributes `att_b` (an `--attrs` spec) and the source ones `att_a`.

`att_b` specs (`--attrs`), applied to each face's source attributes `att_a` (13 0/1 values, SPEC.md order):

  flip:NAME[,NAME...]   att_b = att_a with the named attributes inverted (e.g. `flip:Eyeglasses,Bangs`)
  set:NAME=V[,...]      att_b = att_a with the named attributes set to V in {0, 1}
  bits:B1B2...B13       att_b = this explicit 13-bit vector for every face (e.g. `bits:0010000110101`)
  roll                  att_b of face i = att_a of face i-1 within the set (a permutation, AttGAN's training scheme;
                        used by `evaluate`, as in the trainer's report)

`att_a` comes from the input folder's `attributes.csv` (columns `file` and the 13 attributes) when it lists the file;
otherwise from the discriminator's attribute head: `att_a = [sigmoid(D_att(x)) > 0.5]`, an estimate whose accuracy
depends on how well D_att was trained (a demo-scale run predicts poorly). Each sidecar records which source was used.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from erasablemask_jax.data.labels import ATTRIBUTES
from erasablemask_jax.data.labels import NUM_ATTRIBUTES

DEFAULT_PROTECT_SPEC = "flip:Eyeglasses"
SPEC_HELP = ("flip:NAME[,NAME...] | set:NAME=0|1[,...] | bits:<13 0/1 digits> | roll; attribute names: "
             + ", ".join(ATTRIBUTES))


class AttributeSpecError(ValueError):
  """An `--attrs` / `--source-attrs` value that cannot be used; the message shows the accepted forms."""


def _index(name: str, spec: str) -> int:
  if name not in ATTRIBUTES:
    lower = {a.lower(): a for a in ATTRIBUTES}
    if name.lower() in lower:
      return ATTRIBUTES.index(lower[name.lower()])
    raise AttributeSpecError(f"attribute spec {spec!r}: unknown attribute {name!r}; expected {SPEC_HELP}")
  return ATTRIBUTES.index(name)


def parse_bits(text: str, spec: str | None = None) -> np.ndarray:
  """A 13-character 0/1 string (commas allowed) -> float32 (13,)."""
  digits = text.replace(",", "").strip()
  if len(digits) != NUM_ATTRIBUTES or set(digits) - {"0", "1"}:
    raise AttributeSpecError(f"attribute spec {spec or text!r}: need exactly {NUM_ATTRIBUTES} digits 0/1 in the order "
                             f"{', '.join(ATTRIBUTES)}")
  return np.array([float(d) for d in digits], np.float32)


@dataclasses.dataclass(frozen=True)
class AttributeSpec:
  """A parsed `--attrs` spec; `apply(att_a)` gives `att_b` for a whole set of faces at once."""

  text: str
  kind: str  # "flip" | "set" | "bits" | "roll"
  indices: tuple[int, ...] = ()
  values: tuple[float, ...] = ()

  def apply(self, att_a: np.ndarray) -> np.ndarray:
    """att_a float (N, 13) 0/1 -> att_b float32 (N, 13)."""
    att_a = np.asarray(att_a, np.float32)
    att_b = att_a.copy()
    if self.kind == "flip":
      att_b[:, list(self.indices)] = 1.0 - att_b[:, list(self.indices)]
    elif self.kind == "set":
      att_b[:, list(self.indices)] = np.asarray(self.values, np.float32)
    elif self.kind == "bits":
      att_b[:] = np.asarray(self.values, np.float32)
    else:
      if len(att_a) < 2:
        raise AttributeSpecError("attribute spec 'roll' permutes attributes within the set and needs >= 2 faces; "
                                 "use flip:NAME or bits:... for a single face")
      att_b = np.roll(att_a, 1, axis=0)
    return att_b

  def to_json(self) -> str:
    return self.text


def parse_spec(text: str) -> AttributeSpec:
  """Parses an `--attrs` value (module docstring for the forms)."""
  text = text.strip()
  kind, _, rest = text.partition(":")
  if kind == "roll" and not rest:
    return AttributeSpec(text, "roll")
  if kind == "bits":
    return AttributeSpec(text, "bits", values=tuple(parse_bits(rest, text).tolist()))
  if kind == "flip" and rest:
    return AttributeSpec(text, "flip", indices=tuple(_index(n.strip(), text) for n in rest.split(",") if n.strip()))
  if kind == "set" and rest:
    indices, values = [], []
    for item in rest.split(","):
      name, eq, value = item.partition("=")
      if not eq or value.strip() not in ("0", "1"):
        raise AttributeSpecError(f"attribute spec {text!r}: {item!r} is not NAME=0 or NAME=1; expected {SPEC_HELP}")
      indices.append(_index(name.strip(), text))
      values.append(float(value))
    return AttributeSpec(text, "set", tuple(indices), tuple(values))
  raise AttributeSpecError(f"attribute spec {text!r} not understood; expected {SPEC_HELP}")


def flipped_names(att_a: np.ndarray, att_b: np.ndarray) -> list[str]:
  """Names of the attributes where the two 0/1 vectors (13,) differ."""
  return [a for a, x, y in zip(ATTRIBUTES, np.asarray(att_a), np.asarray(att_b)) if round(float(x)) != round(float(y))]


def invert(att: np.ndarray, names: list[str]) -> np.ndarray:
  """`att` (13,) with the named attributes inverted (1 - v)."""
  att = np.asarray(att, np.float32).copy()
  for name in names:
    i = _index(name, ",".join(names))
    att[i] = 1.0 - att[i]
  return att


def predicted(logits: np.ndarray) -> np.ndarray:
  """D_att's decision: `sigmoid(logits) > 0.5`, i.e. `logits > 0`, as float32 0/1."""
  return (np.asarray(logits) > 0).astype(np.float32)
