"""`erasablemask sweep --param gamma|beta --runs RUN1,RUN2,... [--reports DIR1,DIR2,...] --out DIR`: Fig. 5.

Reads each run's config value and its evaluation report (default RUN/evaluation/report.json, written by
`erasablemask evaluate --out RUN/evaluation`), and plots ASR / ESR / L1 against the value.
"""

from __future__ import annotations

import argparse
import sys

from erasablemask_jax.commands import _outputs


def register(subparsers) -> None:
  p = subparsers.add_parser("sweep", help="the Fig. 5 ablation plots from several evaluated runs",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--param", required=True, choices=("gamma", "beta"), help="the swept config value (model.<param>)")
  p.add_argument("--runs", required=True, help="comma-separated trained run directories")
  p.add_argument("--reports", default=None, help="comma-separated evaluation report folders, one per run")
  p.add_argument("--out", required=True, help="where sweep.json, sweep.md and the plots go")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.evaluation import sweep  # pylint: disable=import-outside-toplevel

  runs = [r for r in args.runs.split(",") if r]
  reports = [r for r in args.reports.split(",") if r] if args.reports else None
  try:
    _outputs.check_writable(args.out, "--out")
    result = sweep.sweep(args.param, runs, args.out, reports)
  except (FileNotFoundError, ValueError, KeyError, _outputs.OutputLocationError) as e:
    print(f"erasablemask sweep: {e}", file=sys.stderr)
    return 1
  models = sorted(result["runs"][0]["asr"])
  print(sweep.format_markdown(result, models))
  print(_outputs.outputs_line("sweep", args.out, "sweep.json, sweep.md, sweep_*.png"))
  return 0
