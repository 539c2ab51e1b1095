"""XLA:CPU options in our jaxlib (oneDNN, XNNPACK, scheduler, fast math) and their effect on the stage-2 step.

Discovery: the flag names are read from the jaxlib shared libraries themselves (every `xla_cpu_*` string that is
not a truncated copy of a longer one), so the list is what this jaxlib knows, not a list from documentation.

Timing: XLA_FLAGS is read once when the backend starts, so each setting runs `step_throughput.py --stages
2:meta_auxiliary` in its own process; the settings are cycled `--rounds` times (base, flag 1, flag 2, ..., base,
...) so that a drifting machine load reaches each of them alike. A setting XLA rejects is reported, not fatal.
`--xla_cpu_enable_fast_math=true` changes numerics (it is timed for headroom, not as a candidate default).

    python -m benchmarks.xla_cpu_flags --list
    python -m benchmarks.xla_cpu_flags                      # the README setting, 2 rounds: ~20-30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

from benchmarks import results as results_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYWORDS = ("onednn", "xnn", "ynn", "mkl", "dnn", "fast_math", "scheduler", "eigen", "thunk", "fusion", "concurrency")
# The settings timed by default, each kept only if its flag name is in this jaxlib.
CANDIDATES = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_enable_fast_math=true",
)
_NAME = re.compile(rb"xla_cpu_[a-z0-9_]+")


def discover() -> list[str]:
  """Every `xla_cpu_*` flag name in jaxlib's shared libraries (names that only prefix a longer one dropped)."""
  import jaxlib  # pylint: disable=g-import-not-at-top

  found: set[str] = set()
  for lib in sorted(pathlib.Path(jaxlib.__file__).parent.glob("*.so")):
    found.update(m.group().decode() for m in _NAME.finditer(lib.read_bytes()))
  return sorted(n for n in found if not any(o != n and o.startswith(n) and o[len(n)] != "_" for o in found))


def print_discovered(all_flags: bool = False) -> None:
  flags = discover()
  shown = [k for k in flags if all_flags or any(w in k for w in KEYWORDS)]
  print(f"{len(flags)} xla_cpu_* flags in this jaxlib; {'all' if all_flags else 'performance-related'}:")
  for name in shown:
    print(f"  --{name}")


def _run(flags: str, args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "row.json"
    cmd = [sys.executable, "-m", "benchmarks.step_throughput", "--stages", "2:meta_auxiliary", "--row-only",
           "--interleave-rounds", "0", "--out", str(out), *args.step_args.split()]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    (row,) = json.loads(out.read_text())["rows"].values()
  return {"median_s": row["median_s"], "compile_s": row["compile_s"], "flops": row["flops"],
          "rss_peak_mib": row.get("rss_peak_mib")}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--list", action="store_true", help="print the discovered flags and exit")
  ap.add_argument("--all", action="store_true", help="with --list: every xla_cpu_* flag")
  ap.add_argument("--flags", default="", help="';'-separated XLA_FLAGS settings to time (default: CANDIDATES "
                  "present in this jaxlib)")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--step-args", default="--image-size 128 --batch 4 --width 16 --warmup 2 --steps 5",
                  help="step_throughput.py arguments of each run")
  ap.add_argument("--out", default=results_lib.out_path("xla_cpu_flags.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  if args.list:
    print_discovered(args.all)
    return 0
  known = discover()
  settings = [f for f in args.flags.split(";") if f] if args.flags else [
      c for c in CANDIDATES if c.removeprefix("--").split("=")[0] in known]
  skipped = [c for c in CANDIDATES if not args.flags and c not in settings]
  runs = {"": [], **{f: [] for f in settings}}
  for r in range(args.rounds):
    for flags in runs:
      res = _run(flags, args)
      runs[flags].append(res)
      label = flags or "(base)"
      print(f"round {r + 1} {label:<75} " + (f"{res['median_s']:.3f} s" if "median_s" in res else res["error"]),
            flush=True)
  summary = {}
  for flags, results in runs.items():
    ok = [x["median_s"] for x in results if "median_s" in x]
    summary[flags or "base"] = {"median_s": statistics.median(ok) if ok else None, "runs": results}
  base = summary["base"]["median_s"]
  print(f"\n{'XLA_FLAGS':<78}{'median s':>10}{'vs base':>9}")
  for name, row in summary.items():
    m = row["median_s"]
    row["over_base"] = m / base if m and base else None
    print(f"{name:<78}" + (f"{m:>10.3f}{row['over_base']:>8.2f}x" if m else f"{'failed':>10}"))
  out = results_lib.write_report(args.out, "xla_cpu_flags", argv, {
      "settings": vars(args), "skipped_not_in_jaxlib": skipped,
      "discovered": sorted(k for k in known if any(w in k for w in KEYWORDS)), "results": summary}, load_start)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
