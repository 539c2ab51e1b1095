"""The closing report of a training run: white-box ASR and ESR on held-out faces against the clean baselines.

For each surrogate and each face `x_cov` of the held-out split (or, without one, the first training batch), with
`att_b` the held-out labels rolled by one face (a permutation, as in training):
- `cos(FR(x), FR(x_target))` for x in {x_cov (clean), x_cov^{att_b} (attribute edit only), x_adv, x_rec};
- ASR = fraction above tau1 (the model's calibrated threshold at `fr.tau1_far`), ESR = fraction of restored faces below
  tau2 (at `fr.tau2_far`), with the same rates for the clean and edited baselines. Thresholds come from the FR model's
  card (`erasablemask calibrate --store`); an uncalibrated model reports cosines only.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax.fr.preprocess import uint8_to_minus1_1
from erasablemask_jax.metrics import recognition
from erasablemask_jax.train.writer import save_image_grid

IMAGES = ("clean", "edit", "adv", "rec")


def _threshold(recogniser, far: float) -> float | None:
  value = recogniser.thresholds.get(f"far_{far:g}")
  return None if value is None else float(value)


def whitebox_report(trainer, state) -> dict:
  """Computes the report, writes `report.json` and `report.png` to the workdir and returns it."""
  held_out = trainer.splits is not None and len(trainer.splits.eval["image"]) > 0
  if held_out:
    images, att_a = trainer.splits.eval["image"], trainer.splits.eval["att"]
  else:
    batch = next(trainer.source)
    images, att_a = batch["image"], batch["att_a"]
  x = uint8_to_minus1_1(images)
  att_a = jnp.asarray(att_a, jnp.float32)
  att_b = jnp.roll(att_a, 1, axis=0)
  models = trainer.models

  @jax.jit
  def forward(state, x, att_a, att_b):
    (x_adv, x_edit), _ = models.protect(state.g.variables, state.e_adv.variables, x, att_b)
    x_rec, _ = models.restore(state.r.variables, x_adv, att_a)
    return {"clean": x, "edit": x_edit, "adv": x_adv, "rec": x_rec}

  outputs = forward(state, x, att_a, att_b)
  config = trainer.config
  report = {"faces": int(x.shape[0]), "split": "held-out" if held_out else "training batch",
            "image_size": config.image_size, "steps": int(state.step), "surrogates": {}}
  for surrogate, target in zip(trainer.surrogates, trainer.targets):
    cos = {k: np.asarray(surrogate.embed(v) @ target) for k, v in outputs.items()}
    tau1 = _threshold(surrogate.recogniser, config.fr.tau1_far)
    tau2 = _threshold(surrogate.recogniser, config.fr.tau2_far)
    entry = {"mean_cos": {k: float(c.mean()) for k, c in cos.items()}, "tau1": tau1, "tau2": tau2}
    if tau1 is not None:
      entry["asr"] = {k: recognition.attack_success_rate(cos[k], tau1) for k in ("clean", "edit", "adv")}
    if tau2 is not None:
      entry["esr"] = {k: recognition.erasure_success_rate(cos[k], tau2) for k in ("adv", "rec")}
    entry["cos"] = {k: c.tolist() for k, c in cos.items()}
    report["surrogates"][surrogate.spec] = entry
  workdir = pathlib.Path(trainer.workdir)
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  save_image_grid(workdir / "report.png", [np.asarray(outputs[k]) for k in IMAGES])
  return report


def format_report(report: dict) -> str:
  """A Markdown table of the report."""
  lines = [f"White-box report: {report['faces']} {report['split']} faces at {report['image_size']}x"
           f"{report['image_size']} after {report['steps']} steps (x_cov | x_cov^att_b | x_adv | x_rec in report.png)",
           "", "| surrogate | cos clean | cos edit | cos adv | cos rec | ASR clean | ASR edit | ASR adv | ESR rec |",
           "|---|---|---|---|---|---|---|---|---|"]
  for spec, e in report["surrogates"].items():
    c = e["mean_cos"]
    asr = e.get("asr", {})
    esr = e.get("esr", {})

    def pct(d, k):
      return f"{100 * d[k]:.1f}%" if k in d else "n/a"

    lines.append(f"| {spec} | {c['clean']:.3f} | {c['edit']:.3f} | {c['adv']:.3f} | {c['rec']:.3f} | "
                 f"{pct(asr, 'clean')} | {pct(asr, 'edit')} | {pct(asr, 'adv')} | {pct(esr, 'rec')} |")
  taus = {spec: (e["tau1"], e["tau2"]) for spec, e in report["surrogates"].items()}
  lines += ["", f"thresholds (tau1, tau2) from each model's calibrated card: {taus}"]
  return "\n".join(lines)
