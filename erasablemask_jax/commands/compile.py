"""`erasablemask compile --config FILE --topology NAME`: compile a run's steps for a TPU slice on this machine.

Memory per chip, FLOPs, roofline step time and collectives of the three stage steps and protect / restore, from the
same build as `erasablemask train` (`train.build`: mesh, shardings, donation) with no weights and no data
(`erasablemask_jax.aot`). Needs libtpu (`pip install "erasablemask-jax[tpu]"`). The JSON at `--out` is rewritten after
each program, and a rerun with the same config and topology keeps the programs it already holds, so a long compile
can be stopped and resumed.
"""

from __future__ import annotations

import json
import pathlib
import sys

from erasablemask_jax.commands import _args, _outputs
from erasablemask_jax.config import ConfigError, add_config_argument, config_from_args

PROGRAMS = ("1", "2", "3", "protect", "restore")


def register(subparsers) -> None:
  p = subparsers.add_parser("compile", help="compile the training steps for a TPU topology (memory per chip, "
                            "roofline step time) without a TPU")
  add_config_argument(p)
  p.add_argument("--topology", required=True, help="TPU slice, GENERATION:SHAPE: v5e:2x2, v5e:4x4 (16 chips, 4 "
                 "hosts), v4:2x2x2, v5p:2x2x1, v6e:2x4")
  p.add_argument("--num-slices", type=_args.positive_int, default=1, help="slices joined over the data-centre network")
  p.add_argument("--out", help="write the report as JSON here (rewritten after each program; a rerun resumes)")
  p.add_argument("--surrogate-archs", help="comma-separated architectures of config.fr.surrogates, in order, where "
                 "their converted directories are absent (e.g. ir_152,ir_se_50,mobilefacenet); default: each card's, "
                 "else the name the config spells")
  p.add_argument("--programs", default=",".join(PROGRAMS), help=f"subset of {','.join(PROGRAMS)} to compile")
  p.add_argument("--compile-effort", type=float, default=0.0, help="XLA's exec_time_optimization_effort in "
                 "[-1, 1]: -1 compiles 2-4x as fast for a program within ~10%% in time and memory (each program's entry "
                 "records it; programs already in --out keep theirs); default 0")
  p.set_defaults(func=run)


def _previous(path: pathlib.Path | None, key: dict) -> dict[str, dict]:
  """The programs an earlier run with the same config and topology already wrote to `path`."""
  if path is None or not path.is_file():
    return {}
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  if {k: old.get(k) for k in key} != key:
    return {}
  return {**{str(s["stage"]): s for s in old.get("stages", [])}, **{f["function"]: f for f in old.get("functions", [])}}


def format_report(report: dict) -> str:
  gib = 2**30
  lines = [f"{report['topology']} x{report['num_slices']}: {report['chips']} chips ({report['chip']}, "
           f"{report['stages'][0]['chip_bytes'] / gib if report['stages'] else 0:.0f} GiB each) on {report['hosts']} "
           f"host{'s' if report['hosts'] > 1 else ''}; global batch {report['global_batch']}, state {report['mesh_state']}",
           f"{'program':<9}{'arg GiB':>9}{'out GiB':>9}{'temp GiB':>10}{'alias GiB':>10}{'total GiB':>10}{'fits':>6}"
           f"{'GFLOP':>10}{'roofline ms':>13}{'coll. MiB':>11}{'compile s':>11}"]
  for r in report["stages"] + report["functions"]:
    m = r["per_chip_bytes"]
    name = f"stage {r['stage']}" if "stage" in r else r["function"]
    coll = sum(c["bytes"] for c in r["collectives"]) / 2**20
    lines.append(f"{name:<9}{m['argument'] / gib:>9.2f}{m['output'] / gib:>9.2f}{m['temp'] / gib:>10.2f}"
                 f"{m['alias'] / gib:>10.2f}{m['total'] / gib:>10.2f}{'yes' if r['fits'] else 'NO':>6}"
                 f"{r['flops'] / 1e9:>10.1f}{r['roofline_s'] * 1e3:>13.2f}{coll:>11.1f}{r['compile_s']:>11.1f}")
  sources = {r["roofline_source"] for r in report["stages"] + report["functions"]}
  lines.append("roofline: " + ("the compiler's estimate" if sources == {"compiler"} else
                               "max(FLOPs / peak, bytes / HBM bandwidth) at the chip's published peaks"))
  quick = sorted({f"{'stage ' if 'stage' in r else ''}{r.get('stage', r.get('function'))}"
                  for r in report["stages"] + report["functions"] if r.get("compile_effort", 0.0)})
  if quick:
    lines.append("compiled at a lower effort (--compile-effort, XLA's exec_time_optimization_effort): "
                 + ", ".join(quick))
  return "\n".join(lines + report.get("advice", []))


def run(args) -> int:
  config = config_from_args(args)
  out = pathlib.Path(args.out) if args.out else None
  if out is not None:
    _outputs.check_writable(out, "--out", is_file=True)
  programs = [p.strip() for p in args.programs.split(",") if p.strip()]
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown:
    raise ConfigError(f"--programs: unknown {', '.join(unknown)}; choose from {','.join(PROGRAMS)}")
  archs = [a.strip() for a in args.surrogate_archs.split(",")] if args.surrogate_archs else None

  import jax  # pylint: disable=import-outside-toplevel

  from erasablemask_jax import aot  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference.sidecar import write_json_atomic  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_enable_compilation_cache", False)  # compile times are a figure of the report: never a read

  key = {"config": args.config, "overrides": list(args.config_overrides), "topology": args.topology,
         "num_slices": args.num_slices, "surrogate_archs": archs}
  done = _previous(out, key)

  def write(report):
    if out is not None:
      write_json_atomic(out, {**key, **report})

  try:
    report = aot.compile_run(config, args.topology, args.num_slices, archs, programs, done, write,
                             effort=args.compile_effort)
  except aot.LibtpuMissing as e:
    print(f"erasablemask compile: {e}", file=sys.stderr)
    return 1
  chips = report["chips"]
  report["advice"] = [aot.fit_advice({**s, "stage": s.get("stage", s.get("function"))}, config, chips)
                      for s in report["stages"] + report["functions"] if not s["fits"]]
  write(report)
  if report["surrogates"]:
    print("surrogates: " + "; ".join(report["surrogates"]))
  print(format_report(report))
  if out is not None:
    print(_outputs.outputs_line("compile", out))
  return 0
