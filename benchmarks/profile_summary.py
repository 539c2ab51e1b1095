"""Top ops of the stage-2 step and their share of it, from the profiles `step_throughput.py --profile DIR` writes.

JAX: the Perfetto trace (`DIR/jax/**/perfetto_trace.json.gz`), each event's self time (its duration minus that of
the events nested in it on the same thread), summed by name with XLA's numeric suffixes removed (`fusion.12` ->
`fusion`, or `--keep-suffix`), Python-tracer events (`$file:line ...`) left out. torch: the profiler's `key_averages()` (`DIR/torch_<formulation>.json`), self CPU
time (self device time on CUDA). For each op: milliseconds per step, its share of all ops' self time (`busy`) and
of the step's wall time (`of step`; over 100% in sum when ops run on several threads at once).

    python -m benchmarks.profile_summary DIR [--top 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
from typing import Any

from benchmarks import results as results_lib

_SUFFIX = re.compile(r"(\.\d+)+$")


def _self_times(events: list[dict[str, Any]], keep_suffix: bool) -> dict[str, float]:
  """Summed self time (us) by event name of complete ("X") trace events, nesting per (pid, tid)."""
  by_thread = collections.defaultdict(list)
  for e in events:
    # "$file:line name" events are the Python tracer's (the benchmark's own Python, e.g. stop_trace), not step ops.
    if e.get("ph") == "X" and "dur" in e and not str(e.get("name", "")).startswith("$"):
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  totals: dict[str, float] = collections.defaultdict(float)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    stack: list[list] = []  # [end, name, self_us]
    for e in thread:
      ts, dur = float(e["ts"]), float(e["dur"])
      while stack and stack[-1][0] <= ts:
        end, name, own = stack.pop()
        totals[name] += own
      if stack:
        stack[-1][2] -= dur
      name = e["name"] if keep_suffix else _SUFFIX.sub("", e["name"])
      stack.append([ts + dur, name, dur])
    for _, name, own in stack:
      totals[name] += own
  return totals


def _runtime(name: str) -> bool:
  """The JAX/PjRt runtime's own events (dispatch, waiting for the thunks), not ops of the program."""
  return "::" in name or name.startswith(("PjitFunction", "Pjit", "ExecuteHelper"))


def jax_ops(directory: pathlib.Path, keep_suffix: bool = False, runtime: bool = False) -> dict[str, float]:
  """Self time in us by op name from the newest Perfetto trace under `directory/jax` (runtime events dropped
  unless `runtime`)."""
  traces = sorted((directory / "jax").rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory / 'jax'}; run step_throughput.py --profile")
  with gzip.open(traces[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  totals = _self_times(events, keep_suffix)
  return totals if runtime else {k: v for k, v in totals.items() if not _runtime(k)}


def torch_ops(path: pathlib.Path) -> dict[str, float]:
  """Self time in us by op name from a `torch_<formulation>.json` (device time where it was recorded)."""
  ops = json.loads(path.read_text())
  device = any(o.get("self_device_us") for o in ops)
  return {o["name"]: float(o["self_device_us"] if device else o["self_cpu_us"]) for o in ops}


def summarise(totals: dict[str, float], steps: int, wall_s: float, top: int) -> list[dict[str, Any]]:
  busy = sum(totals.values()) or 1.0
  step_ms = 1e3 * wall_s / steps
  rows = []
  for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    ms = us / 1e3 / steps
    rows.append({"op": name, "ms_per_step": ms, "busy_share": us / busy, "step_share": ms / step_ms})
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("directory")
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--keep-suffix", action="store_true", help="do not merge XLA ops that differ by a numeric suffix")
  ap.add_argument("--runtime", action="store_true", help="keep the JAX runtime's own events (dispatch, waits)")
  ap.add_argument("--json", default="", help="also write the summary here")
  args = ap.parse_args(argv)
  directory = pathlib.Path(args.directory)
  meta_path = directory / "profile_meta.json"
  if not meta_path.is_file():
    ap.error(f"{meta_path} not found: profile first with `python -m benchmarks.step_throughput --profile {directory}`")
  meta = json.loads(meta_path.read_text())
  sources = {"jax": lambda: jax_ops(directory, args.keep_suffix, args.runtime)}
  for path in sorted(directory.glob("torch_*.json")):
    sources[path.stem] = lambda path=path: torch_ops(path)
  summary = {}
  for name, load in sources.items():
    wall = meta["wall_s"].get(name)
    if wall is None:
      continue
    rows = summarise(load(), meta["steps"], wall, args.top)
    summary[name] = {"step_ms": 1e3 * wall / meta["steps"], "top": rows}
    print(f"\n{name}: {summary[name]['step_ms']:.1f} ms/step over {meta['steps']} profiled steps")
    print(f"{'op':<60}{'ms/step':>10}{'busy':>8}{'of step':>9}")
    for r in rows:
      print(f"{r['op'][:59]:<60}{r['ms_per_step']:>10.2f}{r['busy_share']:>8.1%}{r['step_share']:>9.1%}")
  if args.json:
    results_lib.write_report(args.json, "profile_summary", argv, {"profile": str(directory), "summary": summary})
  return 0


if __name__ == "__main__":
  sys.exit(main())
