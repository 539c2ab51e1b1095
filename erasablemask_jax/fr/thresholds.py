"""Cosine thresholds of a face-recognition model: stored per view in its card, looked up with labelled fallbacks.

A model card holds the thresholds `erasablemask calibrate --store` computed, per view (`fr.views`):

    card["thresholds_by_view"][VIEW] = {"far_0.1": t, "far_0.01": t, "far_0.001": t}
    card["calibration_by_view"][VIEW] = {"auc", "tar_at_far", "faces", ...}

and, for compatibility, `card["thresholds"]` / `card["calibration"]` are the `arcface112` ones (a card written before
views existed has only those, and they are read as `arcface112`).

`lookup(card, far, view, source)` is the one rule every report uses. In order, the first that exists:

1. the threshold calibrated on `view` itself                                   -> "calibrated on VIEW"
2. the one calibrated on `arcface112` (plain aligned crops), when `view` differs -> "arcface112 threshold, VIEW not
   calibrated" (a fallback: the view the models really see has another score distribution)
3. with `source="peer_default"` only: the peers' published threshold for the architecture (`PEER_DEFAULTS`, LFW,
   valid for the peers' original weights)                                      -> "peer default, not calibrated here"

else None: the rates that need it are "not available", never a made-up number.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from erasablemask_jax.fr.views import ARCFACE112

THRESHOLD_SOURCES = ("calibrated", "peer_default")
CALIBRATED, FALLBACK, PEER = "calibrated", "arcface112 fallback", "peer default"


def far_key(far: float) -> str:
  """`0.01` -> `"far_0.01"` (the key of card thresholds and result entries)."""
  return f"far_{float(far):g}"


@dataclasses.dataclass(frozen=True)
class PeerDefault:
  """A threshold table published with the peers' code (AMT-GAN, Adv-Makeup, CLIP2Protect: `th_dict`).

  Attributes:
    peer_name: the peers' name for the model.
    weights: the peers' checkpoint file, the only weights the numbers hold for.
    arch: our architecture of that network, or None when it is not one registered here.
    thresholds: `{far_key: cosine}`, computed by the peers on LFW.
  """

  peer_name: str
  weights: str
  arch: str | None
  thresholds: Mapping[str, float]


# The peers' `th_dict[name] = (FAR 0.1, FAR 0.01, FAR 0.001)`; SPEC.md quotes the FAR 0.01 column.
_PEERS = (
    PeerDefault("ir152", "ir152.pth", "ir_152", {"far_0.1": 0.094632, "far_0.01": 0.166788, "far_0.001": 0.227922}),
    PeerDefault("irse50", "irse50.pth", "ir_se_50", {"far_0.1": 0.144840, "far_0.01": 0.241045,
                                                     "far_0.001": 0.312703}),
    PeerDefault("facenet", "facenet.pth", "inception_resnet_v1", {"far_0.1": 0.256587, "far_0.01": 0.409131,
                                                                  "far_0.001": 0.591191}),
    # InsightFace_Pytorch's MobileFaceNet(512): not our `mobilefacenet` (foamliu, 128-d), so never applied here.
    PeerDefault("mobile_face", "mobile_face.pth", None, {"far_0.1": 0.183635, "far_0.01": 0.301611,
                                                         "far_0.001": 0.380878}),
)
PEER_DEFAULTS = {p.peer_name: p for p in _PEERS}
PEER_DEFAULTS_BY_ARCH = {p.arch: p for p in _PEERS if p.arch is not None}


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A threshold with where it came from.

  Attributes:
    value: the cosine; a pair is accepted when `cos > value`.
    far: the false-accept rate it was set at.
    view: the view it was calibrated on (`"arcface112"`, `"loose_to_arcface@128"`, ...; `"peer"` for a peer default).
    wanted_view: the view it is used for (what the report scores).
    kind: `CALIBRATED` (on `wanted_view`), `FALLBACK` (the arcface112 one for another view) or `PEER`.
  """

  value: float
  far: float
  view: str
  wanted_view: str
  kind: str

  @property
  def label(self) -> str:
    """One line for a report."""
    if self.kind == CALIBRATED:
      return f"calibrated on {self.view}"
    if self.kind == FALLBACK:
      return f"arcface112 threshold, {self.wanted_view} not calibrated"
    return "peer default, not calibrated here"

  def to_json(self) -> dict[str, Any]:
    return {"value": self.value, "far": self.far, "view": self.view, "kind": self.kind, "label": self.label}


def thresholds_by_view(card: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """`{view: {far_key: t}}` of a card; a card's plain `thresholds` count as `arcface112` when that view is absent."""
  out = {view: dict(t) for view, t in card.get("thresholds_by_view", {}).items() if t}
  if card.get("thresholds") and ARCFACE112 not in out:
    out[ARCFACE112] = dict(card["thresholds"])
  return out


def peer_default(card: Mapping[str, Any]) -> PeerDefault | None:
  """The peers' published thresholds for the card's architecture, or None."""
  return PEER_DEFAULTS_BY_ARCH.get(card.get("arch"))


def check_source(source: str) -> None:
  if source not in THRESHOLD_SOURCES:
    raise ValueError(f"fr.threshold_source={source!r}; choose one of {THRESHOLD_SOURCES}")


def taus(card: Mapping[str, Any], fr_config, view: str | None,
         source: str | None = None) -> dict[str, Threshold | None]:
  """The reports' two thresholds for scores of `view`: `{"tau1": at fr.tau1_far (ASR, SMR, IRR), "tau2": at
  fr.tau2_far (ESR)}`, each `lookup`'s answer; `source` defaults to `fr.threshold_source` ("calibrated" for a run
  saved before the key existed)."""
  source = source or fr_config.get("threshold_source", "calibrated")
  return {name: lookup(card, fr_config[f"{name}_far"], view, source) for name in ("tau1", "tau2")}


def lookup(card: Mapping[str, Any], far: float, view: str | None = ARCFACE112,
           source: str = "calibrated") -> Threshold | None:
  """The threshold at `far` for scores of `view` (module docstring: the view's, else arcface112's, else with
  `source="peer_default"` the peers'), or None. `view=None` (unknown) takes the arcface112 one, labelled a fallback."""
  check_source(source)
  key, wanted = far_key(far), view or "an unnamed view"
  by_view = thresholds_by_view(card)
  if view is not None and key in by_view.get(view, {}):
    return Threshold(float(by_view[view][key]), float(far), view, view, CALIBRATED)
  if key in by_view.get(ARCFACE112, {}):
    return Threshold(float(by_view[ARCFACE112][key]), float(far), ARCFACE112, wanted, FALLBACK)
  peer = peer_default(card) if source == "peer_default" else None
  if peer is not None and key in peer.thresholds:
    return Threshold(float(peer.thresholds[key]), float(far), "peer", wanted, PEER)
  return None


def store(card: Mapping[str, Any], view: str, thresholds: Mapping[str, float],
          calibration: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `card` with `thresholds` (and what they were computed from) stored for `view`; the arcface112 view
  also fills the plain `thresholds` / `calibration` fields older readers use."""
  card = dict(card)
  if card.get("thresholds") and "thresholds_by_view" not in card:  # keep a legacy card's arcface112 calibration
    card["thresholds_by_view"] = {ARCFACE112: dict(card["thresholds"])}
    if card.get("calibration"):
      card["calibration_by_view"] = {ARCFACE112: dict(card["calibration"])}
  card["thresholds_by_view"] = {**card.get("thresholds_by_view", {}), view: dict(thresholds)}
  card["calibration_by_view"] = {**card.get("calibration_by_view", {}), view: dict(calibration)}
  if view == ARCFACE112:
    card["thresholds"], card["calibration"] = dict(thresholds), dict(calibration)
  return card
