"""The closing report of a training run: white-box ASR, ESR, SMR and IRR on held-out faces against the clean baselines.

For each surrogate and each face `x_cov` of the held-out split (or, without one, the first training batch), with
`att_b` the held-out labels rolled by one face (a permutation, as in training):
- the generated faces are scored as published: x_cov^{att_b} (attribute edit only) and x_adv are rounded to uint8
  (`image_io.to_uint8`, as `protect` writes the PNG), R restores the rounded x_adv, and x_rec is rounded too;
- `cos(FR(x), FR(x_target))` for x in {x_cov (clean), x_cov^{att_b}, x_adv, x_rec}, and `cos(FR(x), FR(x_cov))` for
  x in {x_cov^{att_b}, x_adv, x_rec}; with several target images, `cos(FR(x), FR(x_target))` is the mean of the
  per-target-image cosines (`e @ t` with the trainer's target `t`, the mean of their unit embeddings:
  `fr.surrogates.target_embeddings`);
- ASR = fraction above tau1 (the model's calibrated threshold at `fr.tau1_far`), ESR = fraction of restored faces below
  tau2 (at `fr.tau2_far`), with the same rates for the clean and edited baselines; SMR = fraction of protected (and
  edited) faces whose cosine to their own source is above tau1 (lower: more private), IRR = the same fraction of
  restored faces (identity recovered). Thresholds come from the FR model's card, calibrated on the view the surrogate
  scores (`fr.input_crop@image_size`; `erasablemask calibrate --run WORKDIR --store`), else its arcface112
  calibration or, with `fr.threshold_source="peer_default"`, the peers' published one, each labelled
  (`fr.thresholds.lookup`); a model with none reports cosines only;
- LPIPS v0.1 (AlexNet) of x_adv against x_cov^{att_b} and of x_rec against x_cov, with the `metrics` extra's weights
  (without them, or below 31 px, the report says why it is missing).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.fr import real_models
from erasablemask_jax.fr.surrogates import Surrogate, load_surrogate, target_embeddings
from erasablemask_jax.image_io import save_image_grid
from erasablemask_jax.image_io import to_uint8
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import lpips
from erasablemask_jax.metrics import recognition

IMAGES = ("clean", "edit", "adv", "rec")
SOURCE_IMAGES = IMAGES[1:]  # compared with their source x_cov (the clean face is the source)
LPIPS_PAIRS = {"adv_vs_edit": ("adv", "edit"), "rec_vs_clean": ("rec", "clean")}  # as evaluate's Table VI


@functools.partial(jax.jit, static_argnums=0)
def _protect(models, g_vars, e_vars, x, att_b):
  (x_adv, x_edit), _ = models.protect(g_vars, e_vars, x, att_b)
  return x_adv, x_edit


@functools.partial(jax.jit, static_argnums=0)
def _restore(models, r_vars, x_adv, att_a):
  return models.restore(r_vars, x_adv, att_a)[0]


def published_outputs(models, state, x: jax.Array, att_a: jax.Array, att_b: jax.Array) -> dict[str, jax.Array]:
  """`{"clean", "edit", "adv", "rec"}` in [-1, 1]; edit, adv and rec rounded to uint8 as published, R restoring the
  rounded x_adv."""
  x_adv, x_edit = _protect(models, state.g.variables, state.e_adv.variables, x, att_b)
  x_adv = uint8_to_minus1_1(to_uint8(x_adv))
  x_rec = _restore(models, state.r.variables, x_adv, att_a)
  return {"clean": x, "edit": uint8_to_minus1_1(to_uint8(x_edit)), "adv": x_adv,
          "rec": uint8_to_minus1_1(to_uint8(x_rec))}


def load_report_models(config, surrogates: Sequence[Surrogate], target_images: np.ndarray
                       ) -> tuple[list[Surrogate], list[jax.Array], dict[str, str]]:
  """The closing report's black boxes (`config.fr.report_models`, `shared:*` expanded; never a surrogate's network):
  `(models, their target embeddings, {spec: why it is not scored})`. A model that fails to load is a reason, not an
  error: the run is trained and saved whatever happens to its report."""
  from erasablemask_jax import convert  # pylint: disable=import-outside-toplevel

  specs, skipped = real_models.expand(tuple(config.fr.get("report_models", ())), [s.spec for s in surrogates])
  models = []
  for spec in specs:
    try:
      models.append(load_surrogate(spec, config.fr.input_crop, config.image_size))
    except (OSError, KeyError, ValueError, ImportError, convert.ModelDirError, convert.CheckpointError) as e:
      skipped[spec] = f"not loaded: {e}"
  targets = target_embeddings(models, uint8_to_minus1_1(target_images)) if models else []
  return models, targets, skipped


def _score(model: Surrogate, target: jax.Array, outputs: dict[str, jax.Array], fr_config) -> dict:
  """One FR model's entry: cosines to the target and to the source, its view's thresholds and the rates."""
  emb = {k: np.asarray(model.embed(v)) for k, v in outputs.items()}
  cos = {k: e @ np.asarray(target) for k, e in emb.items()}
  src = {k: np.sum(emb[k] * emb["clean"], axis=1) for k in SOURCE_IMAGES}
  found = model.taus(fr_config)
  tau1, tau2 = (None if found[k] is None else found[k].value for k in ("tau1", "tau2"))
  entry = {"mean_cos": {k: float(c.mean()) for k, c in cos.items()},
           "mean_cos_source": {k: float(c.mean()) for k, c in src.items()}, "tau1": tau1, "tau2": tau2,
           "view": model.view, "thresholds": {k: None if t is None else t.to_json() for k, t in found.items()}}
  if tau1 is not None:
    entry["asr"] = {k: recognition.attack_success_rate(cos[k], tau1) for k in ("clean", "edit", "adv")}
    entry["smr"] = {k: recognition.source_match_rate(src[k], tau1) for k in ("edit", "adv")}
    entry["irr"] = {"rec": recognition.identity_recovery_rate(src["rec"], tau1)}
  if tau2 is not None:
    entry["esr"] = {k: recognition.erasure_success_rate(cos[k], tau2) for k in ("adv", "rec")}
  entry["cos"] = {k: c.tolist() for k, c in cos.items()}
  entry["cos_source"] = {k: c.tolist() for k, c in src.items()}
  return entry


def whitebox_report(models, state, surrogates: Sequence[Surrogate], targets: Sequence[jax.Array], images: np.ndarray,
                    att_a: np.ndarray, *, split: str, config, workdir: str | os.PathLike[str],
                    blackbox: Sequence[Surrogate] = (), blackbox_targets: Sequence[jax.Array] = (),
                    not_scored: dict[str, str] | None = None) -> dict:
  """Computes the report, writes `report.json` and `report.png` to `workdir` and returns it.

  Args:
    models, state: the run's networks and train state.
    surrogates, targets: the attacked FR models and their target embeddings (`fr.surrogates.target_embeddings`).
    images, att_a: the faces to report on, uint8 `(N, S, S, 3)`, and their attributes (`Trainer.report_faces`).
    split: what the faces are ("held-out" or "training batch"), as the report says.
    config: the run's config (`fr.tau1_far`, `fr.tau2_far`, `fr.threshold_source`, `image_size`).
    workdir: where report.json and report.png go.
    blackbox, blackbox_targets, not_scored: models scored beside the surrogates, never trained against
      (`load_report_models`), their target embeddings, and the models left out with the reason; the report's
      `"blackbox"` and `"not_scored"`.
  """
  x = uint8_to_minus1_1(images)
  att_a = jnp.asarray(att_a, jnp.float32)
  att_b = jnp.roll(att_a, 1, axis=0)
  outputs = published_outputs(models, state, x, att_a, att_b)
  report = {"faces": int(x.shape[0]), "split": split, "image_size": config.image_size, "steps": int(state.step),
            "surrogates": {s.spec: _score(s, t, outputs, config.fr) for s, t in zip(surrogates, targets)},
            "blackbox": {m.spec: _score(m, t, outputs, config.fr) for m, t in zip(blackbox, blackbox_targets)},
            "not_scored": dict(not_scored or {})}
  metric = lpips.load_lpips("alex", None)  # the `metrics` extra's weights, or the reason they are missing
  report["lpips_alex"] = {pair: availability.to_json(lpips.mean_lpips(metric, outputs[a], outputs[b]))
                          for pair, (a, b) in LPIPS_PAIRS.items()}
  workdir = pathlib.Path(workdir)
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  save_image_grid(workdir / "report.png", [np.asarray(outputs[k]) for k in IMAGES])
  return report


def _describe_threshold(name: str, entry: dict) -> str:
  t = entry.get("thresholds", {}).get(name)
  if t is None:
    return f"{name} not calibrated (n/a)" if entry.get(name) is None else f"{name} {entry[name]:.4f}"
  return f"{name} {t['value']:.4f} at FAR {t['far']:g} ({t['label']})"


def _scored(report: dict) -> list[tuple[str, str, dict]]:
  """`(spec, role, entry)` of every model the report scored: the surrogates, then the report's black boxes."""
  return ([(spec, "white-box", e) for spec, e in report["surrogates"].items()]
          + [(spec, "black-box", e) for spec, e in report.get("blackbox", {}).items()])


def format_report(report: dict) -> str:
  """A Markdown table of the report."""
  lines = [f"Closing report: {report['faces']} {report['split']} faces at {report['image_size']}x"
           f"{report['image_size']} after {report['steps']} steps (x_cov | x_cov^att_b | x_adv | x_rec in report.png)",
           "", "cos: to the target (with several target images, the mean of the per-image cosines); src: to the "
           "face's own source x_cov. SMR (lower = more private) and IRR count faces verified as their source at tau1; "
           "all outputs rounded to uint8 as published. White-box: a surrogate the attack trained against; black-box: "
           "a model it never saw.", "",
           "| model | role | cos clean | cos edit | cos adv | cos rec | src edit | src adv | src rec | ASR clean "
           "| ASR edit | ASR adv | ESR rec | SMR edit | SMR adv | IRR rec |", "|---" * 16 + "|"]
  for spec, role, e in _scored(report):
    c, s = e["mean_cos"], e["mean_cos_source"]

    def pct(rate, k):
      d = e.get(rate, {})
      return f"{100 * d[k]:.1f}%" if k in d else "n/a"

    lines.append(f"| {spec} | {role} | " + " | ".join(f"{c[k]:.3f}" for k in IMAGES) + " | "
                 + " | ".join(f"{s[k]:.3f}" for k in SOURCE_IMAGES) + " | "
                 + " | ".join(pct(rate, k) for rate, k in (("asr", "clean"), ("asr", "edit"), ("asr", "adv"),
                                                           ("esr", "rec"), ("smr", "edit"), ("smr", "adv"),
                                                           ("irr", "rec"))) + " |")
  lines += ["", "thresholds (from each model's card, for the view it scores):"]
  lines += [f"- {spec} (view {e.get('view')}): " + "; ".join(_describe_threshold(name, e) for name in ("tau1", "tau2"))
            for spec, _, e in _scored(report)]
  lines += [f"- {spec}: not scored ({why})" for spec, why in report.get("not_scored", {}).items()]
  lines.append("LPIPS v0.1 (AlexNet): " + ", ".join(
      f"{pair} {availability.format_metric(availability.from_json(v))}" for pair, v in report["lpips_alex"].items()))
  lines += ["", *verdict(report)]
  return "\n".join(lines)


IRR_GOAL = 0.8  # the README's target for the demo: restored faces verify as the person for at least 80% of faces


def verdict(report: dict) -> list[str]:
  """Plain sentences on the two things a user judges: did protection move the faces toward the target, and does the
  trusted authority get the person back (IRR against `IRR_GOAL`)."""
  out = []
  for spec, role, e in _scored(report):
    spec = spec if role == "white-box" else f"{spec} (black box)"
    c = e["mean_cos"]
    moved = c["adv"] - c["clean"]
    out.append(f"- {spec}: protection moved the cosine to the target by {moved:+.3f} ({c['clean']:.3f} clean -> "
               f"{c['adv']:.3f} protected)" + (", toward the target." if moved > 0 else ", NOT toward the target."))
    irr = e.get("irr", {}).get("rec")
    if irr is None:
      out.append(f"- {spec}: IRR n/a (no calibrated tau1 for this view), so identity recovery is not measured.")
    elif irr >= IRR_GOAL:
      out.append(f"- {spec}: the restored faces verify as the person for {100 * irr:.1f}% of faces (goal "
                 f"{100 * IRR_GOAL:.0f}%).")
    else:
      out.append(f"- {spec}: IRR {100 * irr:.1f}% is below the {100 * IRR_GOAL:.0f}% goal: with this training budget "
                 "a trusted authority could NOT verify most restored faces as the person. benchmarks/README.md "
                 "('Transfer study') has the 128x128 evidence on six real FR models.")
  return out
