"""The Fig. 5 ablation: ASR, ESR, SMR, IRR and quality of several evaluated runs against one swept config value.

Each run contributes its config value (`model.gamma` or `model.beta`, read from `RUN/config.json`) and its evaluation
report (`REPORT/report.json` written by `erasablemask evaluate`, by default `RUN/evaluation/report.json`). The sweep
plots, per FR model and as the mean over models, ASR and ESR of ErasableMask against the value, its SMR (protected face
verified as its source) and IRR (restored face verified as its source), and the L1 of the protected faces; it writes
`sweep.json`, `sweep.md`, `sweep_asr_esr.png`, `sweep_smr_irr.png` and `sweep_quality.png`. A report written before
SMR / IRR existed contributes None to those.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from erasablemask_jax import run_dir
from erasablemask_jax.evaluation import plots
from erasablemask_jax.inference import sidecar as sidecar_lib

PARAMS = {"gamma": ("model", "gamma"), "beta": ("model", "beta")}
DEFAULT_REPORT = "evaluation"
RATES = ("asr", "esr", "smr", "irr")


def _number(value):
  return None if value is None or isinstance(value, dict) else float(value)


def _read_run(run: pathlib.Path, report_dir: pathlib.Path | None, param: str) -> dict[str, Any]:
  section, key = PARAMS[param]
  value = float(run_dir.read_config_dict(run)[section][key])
  report_path = (report_dir or run / DEFAULT_REPORT) / "report.json"
  if not report_path.is_file():
    raise FileNotFoundError(f"no evaluation report {report_path}; run `erasablemask evaluate --workdir {run} "
                            f"--out {report_path.parent} ...` first (or pass --reports)")
  return {"run": str(run), "value": value, "report": str(report_path), "data": json.loads(report_path.read_text())}


def sweep(param: str, runs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
          reports: Sequence[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
  """Collects the runs' numbers, writes the sweep's JSON, Markdown and plots to `out_dir`, and returns the JSON.

  Args:
    param: "gamma" or "beta".
    runs: trained run directories.
    out_dir: where to write.
    reports: evaluation report folders, one per run (default `RUN/evaluation`).

  Raises:
    ValueError: unknown param, mismatched list lengths, fewer than 2 runs, or runs evaluated on different models.
    FileNotFoundError: a run or report is missing.
  """
  if param not in PARAMS:
    raise ValueError(f"--param {param!r}: choose one of {sorted(PARAMS)}")
  if len(runs) < 2:
    raise ValueError(f"a sweep needs at least 2 runs, got {len(runs)}")
  if reports is not None and len(reports) != len(runs):
    raise ValueError(f"{len(reports)} reports for {len(runs)} runs; give one report folder per run")
  entries = [_read_run(pathlib.Path(r), pathlib.Path(reports[i]) if reports else None, param)
             for i, r in enumerate(runs)]
  models = sorted(entries[0]["data"]["models"])
  for e in entries[1:]:
    if sorted(e["data"]["models"]) != models:
      raise ValueError(f"{e['report']} scores models {sorted(e['data']['models'])}, {entries[0]['report']} scores "
                       f"{models}; evaluate every run with the same --fr/--blackbox")
  values = [e["value"] for e in entries]
  rows = []
  for e in entries:
    t2 = e["data"]["table2"]
    row = {"run": e["run"], "report": e["report"], param: e["value"],
           **{k: {m: _number(t2[m]["erasablemask"].get(k)) for m in models} for k in RATES},
           "l1_protected": _number(e["data"]["table6"]["protected_vs_edit"]["l1"]),
           "l1_restored": _number(e["data"]["table6"]["restored_vs_source"]["l1"])}
    for k in RATES:
      known = [v for v in row[k].values() if v is not None]
      row[f"mean_{k}"] = float(np.mean(known)) if known else None
    rows.append(row)
  result = {"param": param, "runs": rows}
  out_dir = pathlib.Path(out_dir)
  sidecar_lib.write_json_atomic(out_dir / "sweep.json", result)
  sidecar_lib.write_bytes_atomic(out_dir / "sweep.md", format_markdown(result, models).encode("utf-8"))

  def pct(v):
    return None if v is None else 100 * v

  for name, rates in (("asr_esr", ("asr", "esr")), ("smr_irr", ("smr", "irr"))):
    series = {f"mean {k.upper()}": [pct(r[f"mean_{k}"]) for r in rows] for k in rates}
    series.update({f"{m} {k.upper()}": [pct(r[k][m]) for r in rows] for m in models for k in rates})
    plots.sweep_lines(out_dir / f"sweep_{name}.png", param, values, series,
                      f"Fig. 5: {' / '.join(k.upper() for k in rates)} against {param}")
  plots.sweep_lines(out_dir / "sweep_quality.png", param, values,
                    {"L1 protected vs edit": [r["l1_protected"] for r in rows],
                     "L1 restored vs source": [r["l1_restored"] for r in rows]},
                    f"Fig. 5: L1 against {param}", ylabel="L1 on [0, 1]")
  return result


def format_markdown(result: dict[str, Any], models: Sequence[str]) -> str:
  param = result["param"]

  def pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}"

  lines = [f"# Sweep over {param}", "", f"| {param} | mean ASR | mean ESR | mean SMR | mean IRR | "
           + " | ".join(f"{m} ASR / ESR / SMR / IRR" for m in models) + " | L1 protected | run |",
           "|---" * (len(models) + 7) + "|"]
  for r in sorted(result["runs"], key=lambda r: r[param]):
    l1 = "n/a" if r["l1_protected"] is None else f"{r['l1_protected']:.4f}"
    lines.append(f"| {r[param]:g} | " + " | ".join(pct(r[f"mean_{k}"]) for k in RATES) + " | "
                 + " | ".join(" / ".join(pct(r[k][m]) for k in RATES) for m in models) + f" | {l1} | {r['run']} |")
  return "\n".join(lines) + "\n"
