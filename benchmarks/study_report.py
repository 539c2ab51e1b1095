"""The transfer study's tables, targets and figures, from its JSON (`benchmarks/transfer_study.py` writes it).

`summary` (a Markdown row per run), `targets` (issue 29's targets per fold, with the clean faces' ESR beside the ESR
target), `diagnose` (where each run loses ESR / IRR), `paired_differences` (meta_auxiliary minus the other attack kinds,
per face, with bootstrap CIs), `figures` and `face_grid`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from benchmarks import study_scoring as scoring

KINDS = ("meta_auxiliary", "first_order", "ensemble")
BASELINES = ("clean", "edit", "fgsm", "pgd")
# The paper's rows for the same columns (CelebA-HQ, full scale), for the README table.
PAPER = {"asr_blackbox_range": [64.00, 94.00], "mobileface_asr_esr": [92.22, 94.89],
         "ensemble_ablation_mobileface_asr": 90.67}
TARGETS = {"whitebox_asr": 0.80, "irr": 0.90, "esr": 0.90, "blackbox_asr_mean_over_folds": 0.40}


def figures(result: dict, out: pathlib.Path) -> None:
  """Per fold, the fold's named black box's cos(x_adv, target) per attack (study variant) with its 95% CI."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  folds = sorted({r["fold"] for r in result["runs"]})
  if not folds:
    return
  fig, axes = plt.subplots(1, len(folds), figsize=(5 * len(folds), 3.6), squeeze=False)
  order = list(BASELINES) + list(KINDS)
  for ax, fold in zip(axes[0], folds):
    runs = {r["attack"]: r for r in result["runs"] if r["fold"] == fold and r.get("variant") in (None, "study")}
    names = [k for k in order if k in runs]
    means = [runs[k]["metrics"][fold]["cos_adv_mean"] for k in names]
    lo = [m - runs[k]["metrics"][fold]["cos_adv_ci95"][0] for k, m in zip(names, means)]
    hi = [runs[k]["metrics"][fold]["cos_adv_ci95"][1] - m for k, m in zip(names, means)]
    colors = ["#999999" if k in BASELINES else "#1f77b4" for k in names]
    ax.bar(range(len(names)), means, yerr=[lo, hi], color=colors, capsize=3)
    tau1 = result["calibration"][fold]["thresholds"]["far_0.01"]
    ax.axhline(tau1, color="r", ls="--", lw=1, label=f"tau1 (FAR 0.01) = {tau1:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title(f"black box: {fold}")
    ax.set_ylabel("cos(x_adv, target), mean with 95% CI")
    ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = out.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, out.with_suffix(".png"))


def face_grid(out: pathlib.Path, name: str, images: dict) -> pathlib.Path:
  """`<out stem>_faces/<name>.png`: source | edit | protected | restored, six held-out faces."""
  from erasablemask_jax.image_io import save_image_grid

  path = out.parent / f"{out.stem}_faces" / f"{name}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  n = min(6, len(images["source"]))
  save_image_grid(path, [scoring.to_float(images[k][:n]) for k in ("source", "edit", "adv", "rec")])
  return path


def _pct(v) -> str:
  return "n/a" if v is None else f"{100 * v:.1f}"


def _lpips(quality: dict) -> str:
  """"adv / rec": LPIPS of x_adv vs x_cov^{att_b} (vs x_cov for the baselines) and of x_rec vs x_cov."""
  lp = lambda k: "n/a" if quality.get(k, {}).get("lpips") is None else f"{quality[k]['lpips']:.3f}"
  return f"{lp('adv_vs_edit' if 'adv_vs_edit' in quality else 'adv_vs_cov')} / {lp('rec_vs_cov')}"


def summary(result: dict) -> str:
  """A Markdown table per run: white-box ASR, every model's worst ESR / IRR, each black box's ASR and LPIPS."""
  lines = ["| fold | attack | variant | WB ASR (min) | ESR (min, all) | IRR (min, all) | BB ASR per model | BB ASR mean | "
           "LPIPS adv / rec |", "|---|---|---|---|---|---|---|---|---|"]
  for r in result["runs"]:
    m = r["metrics"]
    wb_asr = min(m[w]["asr"] for w in r["surrogates"])
    esr = None if m[r["surrogates"][0]]["esr"] is None else min(v["esr"] for v in m.values())
    irr = None if esr is None else min(v["irr"] for v in m.values())
    if r["attack"] == "clean":  # the untouched faces' ESR: what an exact restorer scores (`clean_esr`)
      esr = min(clean_esr(result, r["fold"]).values())
    bb = " / ".join(f"{b} {_pct(m[b]['asr'])}" for b in r["blackbox"])
    bb_mean = float(np.mean([m[b]["asr"] for b in r["blackbox"]]))
    lines.append(f"| {r['fold']} | {r['attack']} | {r.get('variant') or '-'} | {_pct(wb_asr)} | {_pct(esr)} | "
                 f"{_pct(irr)} | {bb} | {_pct(bb_mean)} | {_lpips(r['quality'])} |")
  for fold, pairs in result.get("paired_difference_meta_auxiliary", {}).items():
    if fold == "what":
      continue
    for pair, d in pairs.items():
      lines.append(f"{fold}: meta_auxiliary - {pair.replace('_vs_', ' vs ')} cos(adv, t): {d['mean']:+.4f} "
                   f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], higher on {d['faces_meta_higher']} of {d['n']} faces")
  for fold, t in result.get("targets", {}).items():
    lines.append(f"targets, {fold}: " + ", ".join(
        f"{k} {'met' if v['met'] else 'missed'} ({_pct(v['value'])}%"
        + (f"; the clean faces' {_pct(v['clean_faces'])}%" if "clean_faces" in v else "") + ")" for k, v in t.items()))
  return "\n".join(lines)


def fold_tables(result: dict) -> str:
  """Markdown, per fold: the clean faces' ESR, then every trained run's ASR / ESR / IRR (%) on each model (surrogates
  first), its LPIPS and stage-2 + 3 seconds; at the end one row per fold against the targets, with meta_auxiliary
  minus the ensemble and minus first order on the fold's named black box. The README's tables are this output."""
  out = []
  for fold in dict.fromkeys(r["fold"] for r in result["runs"]):
    runs = [r for r in result["runs"] if r["fold"] == fold and r.get("variant")]
    if not runs:
      continue
    models = runs[0]["surrogates"] + runs[0]["blackbox"]
    roles = [f"{m} ({'white' if m in runs[0]['surrogates'] else 'black'})" for m in models]
    out += [f"Fold {fold}: ASR / ESR / IRR in %", "", "| run | " + " | ".join(roles) + " | LPIPS adv / rec | stage 2 + 3 (s) |",
            "|---" * (len(models) + 3) + "|"]
    ceiling = clean_esr(result, fold)
    out.append("| clean faces' ESR | " + " | ".join(_pct(ceiling.get(m)) for m in models) + " | | |")
    for r in runs:
      m, t = r["metrics"], r.get("train_s", {})
      cells = [f"{_pct(m[n]['asr'])} / {_pct(m[n]['esr'])} / {_pct(m[n]['irr'])}" for n in models]
      seconds = " + ".join(f"{t[k]:.0f}" for k in ("stage2", "stage3") if k in t)
      out.append(f"| {r['attack']}, {r['variant']} | " + " | ".join(cells)
                 + f" | {_lpips(r['quality'])} | {seconds} |")
    out.append("")
  out += ["| fold | WB ASR min | IRR min | ESR min (clean faces') | BB ASR mean | meta - ensemble, named black box | "
          "meta - first order, named black box |", "|---|---|---|---|---|---|---|"]
  pairs = result.get("paired_difference_meta_auxiliary", {})
  for fold, t in result.get("targets", {}).items():
    if fold == "all_folds":
      continue
    diff = lambda other: (lambda d: "n/a" if d is None else f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")(
        pairs.get(f"bb-{fold}", {}).get(f"{fold}_vs_{other}"))
    esr = t["esr_min_all_models"]
    out.append(f"| {fold} | {_pct(t['whitebox_asr_min']['value'])} | {_pct(t['irr_min_all_models']['value'])} | "
               f"{_pct(esr['value'])} ({_pct(esr.get('clean_faces'))}) | {_pct(t['blackbox_asr_mean']['value'])} | "
               f"{diff('ensemble')} | {diff('first_order')} |")
  if "all_folds" in result.get("targets", {}):
    out.append(f"\nBlack-box ASR, mean over folds: {_pct(result['targets']['all_folds']['blackbox_asr_mean']['value'])}%")
  return "\n".join(out)


def clean_esr(result: dict, fold: str) -> dict[str, float]:
  """Per model, the ESR of the untouched faces: the fraction of the held-out clean faces whose cosine to the target
  is under tau2 (the fold's `clean` row). It is what an exact restorer (R(x_adv) = x_cov) scores, so it bounds ESR
  from above up to R's own loss of identity: tau2 sits at FAR 0.1, so about one impostor pair in ten, and more where
  the target identity is close to the held-out ones, is above it before any protection."""
  from erasablemask_jax.metrics import recognition

  for r in result["runs"]:
    if r["fold"] == fold and r["attack"] == "clean":
      return {name: recognition.erasure_success_rate(np.asarray(m["cos_adv"]), m["tau2"])
              for name, m in r["metrics"].items()}
  return {}


def targets(result: dict) -> dict[str, Any]:
  """Per fold, the meta_auxiliary study row against issue 29's targets; and the black-box ASR mean over folds.

  Beside the ESR target, `clean_faces` is `clean_esr` (the same minimum over models for the untouched faces) and
  `worst_gap_to_clean` the largest `clean ESR - ESR` over models: how much erasure the restorer leaves undone."""
  out, bb_means = {}, []
  for r in result["runs"]:
    if r["attack"] != "meta_auxiliary" or r.get("variant") != "study":
      continue
    m = r["metrics"]
    wb = min(m[w]["asr"] for w in r["surrogates"])
    irr, esr = min(v["irr"] for v in m.values()), min(v["esr"] for v in m.values())
    bb_means.append(float(np.mean([m[b]["asr"] for b in r["blackbox"]])))
    ceiling = clean_esr(result, r["fold"])
    esr_entry = {"value": esr, "met": esr >= TARGETS["esr"]}
    if ceiling:
      esr_entry.update(clean_faces=min(ceiling.values()),
                       worst_gap_to_clean=max(ceiling[k] - v["esr"] for k, v in m.items() if k in ceiling))
    out[r["fold"]] = {"whitebox_asr_min": {"value": wb, "met": wb >= TARGETS["whitebox_asr"]},
                      "irr_min_all_models": {"value": irr, "met": irr >= TARGETS["irr"]},
                      "esr_min_all_models": esr_entry,
                      "blackbox_asr_mean": {"value": bb_means[-1],
                                            "met": bb_means[-1] >= TARGETS["blackbox_asr_mean_over_folds"]}}
  if bb_means:
    mean = float(np.mean(bb_means))
    out["all_folds"] = {"blackbox_asr_mean": {"value": mean, "met": mean >= TARGETS["blackbox_asr_mean_over_folds"]}}
  return out


def diagnose(result: dict) -> str:
  """Per run and model: cos of R(x_adv) and R(x_cov) to the source, a 64-px downscale's, and the restored faces'
  cosine to the target against tau2 (where ESR is lost)."""
  lines = ["| fold | attack | variant | model | cos R(adv),src | cos R(cov),src | cos down64,src | cos R(adv),t | "
           "cos R(cov),t | tau2 | ESR lost | ESR / clean faces' |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["runs"]:
    ceiling = clean_esr(result, r["fold"])
    for model, d in r.get("diagnosis", {}).items():
      lines.append(f"| {r['fold']} | {r['attack']} | {r.get('variant')} | {model} | {d['cos_rec_source']:.3f} | "
                   f"{d['cos_rec_clean_source']:.3f} | {d['cos_down64_source']:.3f} | {d['cos_rec_target']:.3f} | "
                   f"{d['cos_rec_clean_target']:.3f} | {d['tau2']:.3f} | {len(d['esr_lost'])} | "
                   f"{_pct(r['metrics'][model]['esr'])} / {_pct(ceiling.get(model))} |")
  return "\n".join(lines)


def paired_differences(result: dict, reps: int, seed: int) -> dict[str, Any]:
  """Per fold and FR model, meta_auxiliary's per-face cos(x_adv, target) (its study row) minus each other attack
  kind's on the same faces: the mean, its bootstrap 95% CI over faces and how many faces meta_auxiliary moved further.
  Keys are `MODEL_vs_KIND` for the other kind's study row and `MODEL_vs_KIND_VARIANT` for its variants (a control such
  as `ensemble_l_adv_exp`)."""
  out: dict[str, Any] = {"what": "per-face cos(x_adv, target) of meta_auxiliary minus the other kind, same faces, "
                                 f"bootstrap 95% CI over faces ({reps} resamples, seed {seed})"}
  runs = {(r["fold"], r["attack"], r.get("variant")): r for r in result["runs"]}
  for (fold, kind, variant), meta in runs.items():
    if kind != "meta_auxiliary" or variant != "study":
      continue
    others = [(k, v) for (f, k, v) in runs if f == fold and k in ("ensemble", "first_order")]
    for other, other_variant in sorted(others, key=lambda kv: (kv[0], kv[1] != "study", kv[1])):
      name = other if other_variant == "study" else f"{other}_{other_variant}"
      for model, m in meta["metrics"].items():
        d = np.asarray(m["cos_adv"]) - np.asarray(runs[fold, other, other_variant]["metrics"][model]["cos_adv"])
        out.setdefault(f"bb-{fold}", {})[f"{model}_vs_{name}"] = {
            "mean": float(d.mean()), "ci95": scoring.bootstrap_ci(d, reps, seed),
            "faces_meta_higher": int((d > 0).sum()), "n": int(d.size), "whitebox": m["whitebox"]}
  return out
