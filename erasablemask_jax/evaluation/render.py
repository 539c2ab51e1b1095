"""Writing an evaluation (`report.compute_tables`'s result): report.json, report.md in the paper's layout (methods x
FR models), the figures and each model's embeddings (the file list is `report`'s module docstring)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from erasablemask_jax.evaluation import plots
from erasablemask_jax.inference import sidecar as sidecar_lib

METHODS = ("clean", "edit", "fgsm", "pgd", "erasablemask")
SOURCE_METHODS = METHODS[1:]  # the clean face is its own source: no SMR
METHOD_LABELS = {"clean": "Clean", "edit": "Attribute edit", "fgsm": "FGSM", "pgd": "PGD",
                 "erasablemask": "ErasableMask"}


def write_report(out_dir: str | os.PathLike[str], tables: dict[str, Any]) -> None:
  """Writes `compute_tables`'s result to `out_dir`: report.json, report.md, the figures and embeddings/<model>.npz."""
  out_dir = pathlib.Path(out_dir)
  (out_dir / "embeddings").mkdir(parents=True, exist_ok=True)
  for key, arrays in tables["embeddings"].items():
    np.savez(out_dir / "embeddings" / f"{key}.npz", **arrays)
  report = tables["report"]
  sidecar_lib.write_json_atomic(out_dir / "report.json", report)
  sidecar_lib.write_bytes_atomic(out_dir / "report.md", format_markdown(report).encode("utf-8"))
  _figures(out_dir, tables["images"], report)


def _pct(value) -> str:
  if isinstance(value, dict) and "unavailable" in value:
    return "n/a"
  return f"{100 * value:.2f}"


def _num(value, fmt=".4f") -> str:
  if isinstance(value, dict) and "unavailable" in value:
    return f"not available ({value['unavailable']})"
  return format(value, fmt)


def _threshold_cell(info: dict[str, Any], which: str) -> str:
  t = info.get("thresholds", {}).get(which)
  if t is None:
    return "not calibrated" if info[which] is None else f"{info[which]:.4f}"
  return f"{t['value']:.4f} (FAR {t['far']:g}; {t['label']})"


def _model_header(report) -> list[str]:
  return [f"{k} ({'W' if v['whitebox'] else 'B'})" for k, v in report["models"].items()]


def format_markdown(report: dict[str, Any]) -> str:
  """Tables II, V and VI (and the remote scores) as Markdown, in the paper's layout (methods x FR models)."""
  keys = list(report["models"])
  head = _model_header(report)
  lines = [f"# ErasableMask evaluation: {len(report['faces'])} faces at {report['image_size']}x{report['image_size']}, "
           f"checkpoint step {report['run']['step']}",
           "", f"Target: {report['target']} ({report['target_images']} images); att_b: `{report['attrs']}`; att_a "
           f"from {report['att_a_source']}; FGSM/PGD: eps {report['epsilon'] * 127.5:.2f}/255 on [0,1], "
           f"{report['pgd_steps']} PGD steps, surrogates {report['surrogates']}. (W) white-box, (B) black-box.", "",
           "## Table II: attack and erasure success rates (%), and matches to the source face", "",
           "SMR: protected face verified as its source (lower = more private); IRR: restored face verified as its "
           "source (higher = identity recovered); both at tau1. The clean face is its own source (no SMR).", "",
           "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
  for method in METHODS:
    lines.append(f"| {METHOD_LABELS[method]} ASR | "
                 + " | ".join(_pct(report["table2"][k][method]["asr"]) for k in keys) + " |")
  lines.append("| ErasableMask ESR | " + " | ".join(_pct(report["table2"][k]["erasablemask"]["esr"]) for k in keys)
               + " |")
  lines.append("| Clean ESR (no protection) | "
               + " | ".join(_pct(report["table2"][k]["clean"]["esr"]) for k in keys) + " |")
  for method in SOURCE_METHODS:
    lines.append(f"| {METHOD_LABELS[method]} SMR | "
                 + " | ".join(_pct(report["table2"][k][method]["smr"]) for k in keys) + " |")
  lines.append("| ErasableMask IRR | " + " | ".join(_pct(report["table2"][k]["erasablemask"]["irr"]) for k in keys)
               + " |")
  lines += ["", f"Cosines to the target are the mean over the {report['target_images']} target image(s) of the "
            "per-image cosines. Thresholds, per model, for the view it scores:", "",
            "| thresholds | " + " | ".join(head) + " |", "|---" * (len(keys) + 1) + "|",
            "| view scored | " + " | ".join(str(report["models"][k].get("view")) for k in keys) + " |"]
  for which in ("tau1", "tau2"):
    lines.append(f"| {which} | " + " | ".join(_threshold_cell(report["models"][k], which) for k in keys) + " |")
  lines += ["", "## Table V: robustness, ASR / ESR / SMR / IRR (%) after each transform of the protected face", "",
            "| transform | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
  for name in ["none", *report["transforms"]] if keys else []:
    lines.append(f"| {name} | " + " | ".join(
        " / ".join(_pct(report["table5"][k][name][r]) for r in ("asr", "esr", "smr", "irr")) for k in keys) + " |")
  lines += ["", "## Table VI: image quality", "", "| comparison | L1 | MSE | LPIPS | FID |", "|---|---|---|---|---|"]
  for row, label in (("protected_vs_edit", "protected vs attribute-edited clean"),
                     ("restored_vs_source", "restored vs source")):
    q = report["table6"][row]
    lines.append(f"| {label} | {_num(q['l1'])} | {_num(q['mse'])} | {_num(q['lpips'])} | {_num(q['fid'], '.2f')} |")
  if "remote" in report:
    r = report["remote"]
    kinds = ("clean", "adv", "rec")
    mean = lambda k: "no face" if r[k]["mean_confidence"] is None else f"{r[k]['mean_confidence']:.4f}"
    lines += ["", f"## Remote face-compare service ({r['url']}): mean confidence against the target", "",
              "| | clean | protected | restored |", "|---|---|---|---|",
              "| mean confidence | " + " | ".join(mean(k) for k in kinds) + " |"]
    if any(r[k].get("no_face") for k in kinds):
      lines.append("| no face found | " + " | ".join(str(r[k].get("no_face", 0)) for k in kinds) + " |")
    for far, value in r.get("thresholds", {}).items():
      lines.append(f"| share >= its FAR {far} threshold ({value:g}) | "
                   + " | ".join(_pct(r[k]["at_or_above"][far]) + "%" for k in kinds) + " |")
  reasons = sorted(_unavailable_reasons({"table2": report["table2"], "table5": report["table5"]}))
  if reasons:
    lines += ["", "n/a: " + "; ".join(reasons)]
  lines += ["", "Figures: fig4.png (source | attribute edit | FGSM | PGD | protected | restored), table2_asr.png, "
            "table2_source.png, table5_robustness.png, table5_source.png. Embeddings and thresholds: "
            "embeddings/<model>.npz.", ""]
  return "\n".join(lines)


def _unavailable_reasons(tree) -> set[str]:
  if isinstance(tree, dict):
    if set(tree) == {"unavailable"}:
      return {tree["unavailable"]}
    return set().union(*(_unavailable_reasons(v) for v in tree.values())) if tree else set()
  return set()


def _value_or_none(v):
  return None if isinstance(v, dict) else 100 * v


def _figures(out_dir: pathlib.Path, images: dict[str, np.ndarray], report: dict[str, Any]) -> None:
  n = min(8, len(images["clean"]))
  columns = [images[k][:n] if k in images else np.full_like(images["clean"][:n], -1.0)
             for k in ("clean", "edit", "fgsm", "pgd", "adv", "rec")]
  plots.image_grid(out_dir / "fig4.png", columns)
  keys = list(report["models"])
  head = _model_header(report)
  series = {METHOD_LABELS[m] + " ASR": [_value_or_none(report["table2"][k][m]["asr"]) for k in keys] for m in METHODS}
  series["ErasableMask ESR"] = [_value_or_none(report["table2"][k]["erasablemask"]["esr"]) for k in keys]
  plots.grouped_bars(out_dir / "table2_asr.png", head, series, "Table II: ASR / ESR per FR model")
  source = {METHOD_LABELS[m] + " SMR": [_value_or_none(report["table2"][k][m]["smr"]) for k in keys]
            for m in SOURCE_METHODS}
  source["ErasableMask IRR"] = [_value_or_none(report["table2"][k]["erasablemask"]["irr"]) for k in keys]
  plots.grouped_bars(out_dir / "table2_source.png", head, source,
                     "Table II: source match (SMR, lower = private) / identity recovery (IRR)")
  names = ["none", *report["transforms"]]
  for path, rates, title in (("table5_robustness.png", ("asr", "esr"), "Table V: ASR / ESR after transforms"),
                             ("table5_source.png", ("smr", "irr"), "Table V: SMR / IRR after transforms")):
    series5 = {f"{h} {r.upper()}": [_value_or_none(report["table5"][k][nm][r]) for nm in names]
               for k, h in zip(keys, head) for r in rates}
    plots.grouped_bars(out_dir / path, names, series5, title)
