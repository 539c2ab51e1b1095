"""The paper's setting and the study's on TPU slices, compiled ahead of time on this CPU (`erasablemask compile`).

For each setting and topology it runs `erasablemask compile` in its own process (libtpu must be installed: the `tpu`
extra), one after the other, each writing its JSON under `--runs-dir` as each program finishes; a rerun keeps what is
there and compiles only what is missing, so the whole sweep can be stopped and resumed. It then collects
`benchmarks/results/pod_compile.json` (`runs`: each with `config`, `topology` as passed, and the compile's `stages`)
and prints the README table: per-chip HBM and roofline time per stage (marked "(XLA)" where it is the compiler's own
estimate, which libtpu gives at `--compile-effort -1`; else max(FLOPs / peak, bytes / HBM bandwidth)), the implied
wall time of the paper's 200/100/50 epochs of CelebA-HQ (30,000 faces), the largest per-chip batch that fits (the
step's temporaries scaled linearly from the one compiled batch, an extrapolation), and the collectives' share of the
step; beside it the same estimate for one H100 / H200 from the slice's total FLOPs and bytes, the replicated state's
read and write counted once (an estimate: no GPU compile).

    python -m benchmarks.pod_compile                      # everything below (hours on a 2-core CPU)
    python -m benchmarks.pod_compile --only paper --topologies v5e:4x4
    python -m benchmarks.pod_compile --summary-only       # re-read the runs, rewrite the JSON and the table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from benchmarks import results
from erasablemask_jax import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]
# name: (config, overrides, --surrogate-archs). The paper's three white-box surrogates; the K = 3 study's fold
# MobileFace V3 (foamliu, Xiaoccer, MobileFace V2: their architectures, abstract, so no converted file is needed).
SETTINGS = {
    "paper": ("celebahq_paper", [], "ir_152,ir_se_50,mobilefacenet"),
    "study": ("transfer_study", ['--config.fr.surrogates=("fr/foamliu","fr/xiaoccer","fr/mobileface_v2")'],
              "mobilefacenet,mobilefacenet_sphereface,mobileface_v2"),
}
# Cloud TPU names -> topologies: v5e-8 (one host of 8 chips), v5e-16 (4 hosts), v4-16 (8 chips), v5p-8, v6e-8.
BATCH = {"paper": 32, "study": 8}  # the configs' global batches
TOPOLOGIES = {"v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v4-16": "v4:2x2x2", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4"}
EPOCHS = {1: 200, 2: 100, 3: 50}  # the paper's schedule
FACES = 30_000  # CelebA-HQ


def run_path(runs_dir: pathlib.Path, setting: str, topology: str) -> pathlib.Path:
  return runs_dir / f"{setting}__{topology.replace(':', '-')}.json"


def compile_one(setting: str, topology: str, runs_dir: pathlib.Path, batch: int | None, timeout: float,
                programs: str = "1,2,3", effort: float = 0.0) -> int:
  """`erasablemask compile` of one setting on one topology, resuming whatever `runs_dir` already holds."""
  config, overrides, archs = SETTINGS[setting]
  extra = [f"--config.data.batch_size={batch}"] if batch else []
  cmd = [sys.executable, "-m", "erasablemask_jax.cli", "compile", "--config", config, "--topology", topology,
         "--surrogate-archs", archs, "--programs", programs, "--out", str(run_path(runs_dir, setting, topology)),
         *([f"--compile-effort={effort}"] if effort else []), *overrides, *extra]
  print("$", " ".join(cmd), flush=True)
  try:
    rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, check=False).returncode
  except subprocess.TimeoutExpired:
    print(f"{setting} {topology}: stopped after {timeout:.0f} s; rerun to resume", flush=True)
    return 124
  if rc < 0:  # a signal: libtpu 0.0.42.1 overflows its stack on some programs (the study's for v6e:2x4)
    print(f"{setting} {topology}: the compiler crashed (signal {-rc}); the programs compiled before it are kept, the "
          "other runs go on; try another --compile-effort or libtpu version", flush=True)
  elif rc:
    print(f"{setting} {topology}: erasablemask compile exited with {rc} (its message is above); the other runs go on",
          flush=True)
  return rc


def derived(run: dict) -> dict:
  """Training-time estimates of one compiled run (per stage and in all)."""
  chips, batch = run["chips"], run["global_batch"]
  steps_per_epoch = math.ceil(FACES / batch)
  out = {"steps_per_epoch": steps_per_epoch, "stages": {}}
  total = 0.0
  for s in run["stages"]:
    m = s["per_chip_bytes"]
    per_chip = batch // chips
    fixed = m["argument"] + m["output"] - m["alias"]  # state, surrogates and batch: resident whatever the batch
    largest = (math.floor((s["chip_bytes"] - fixed) / (m["temp"] / per_chip))
               if m["temp"] > 0 and s["chip_bytes"] > fixed else None)
    wall = (s["roofline_s"] + s["collective_s"]) * steps_per_epoch * EPOCHS[s["stage"]]
    total += wall
    gpu = {}
    # The whole global batch on one GPU: every chip's FLOPs, and every chip's bytes except the replicated state's,
    # read and written once (2 x the arguments) rather than once per chip.
    state_bytes = 2 * m["argument"]
    gpu_bytes = chips * max(s["bytes_accessed"] - state_bytes, 0) + state_bytes
    for name, chip in aot.GPUS.items():
      seconds = max(s["flops"] * chips / chip.peak_flops, gpu_bytes / chip.hbm_bandwidth)
      gpu[name] = {"step_s": seconds, "wall_h": seconds * steps_per_epoch * EPOCHS[s["stage"]] / 3600}
    out["stages"][s["stage"]] = {"hbm_gib": m["total"] / 2**30, "fits": s["fits"], "roofline_s": s["roofline_s"],
                                 "roofline_source": s.get("roofline_source", "flops_bytes_over_peaks"),
                                 "collective_share": s["collective_share"], "wall_h": wall / 3600,
                                 "largest_per_chip_batch": largest, "gpu_estimate": gpu}
  out["wall_h"] = total / 3600
  return out


def collect(runs_dir: pathlib.Path, settings, topologies) -> dict:
  runs = []
  for setting in settings:
    for topology in topologies:
      path = run_path(runs_dir, setting, topology)
      if not path.is_file():
        continue
      run = json.loads(path.read_text())
      runs.append({"setting": setting, "config": run["config"], "overrides": run["overrides"], "topology": topology,
                   **{k: run[k] for k in ("chip", "chips", "hosts", "global_batch", "mesh_state", "surrogates",
                                          "stages")},
                   "complete": len(run["stages"]) == 3,
                   "derived": derived(run) if run["stages"] else None})
  return {"runs": runs}


def table(report: dict) -> str:
  lines = ["| setting | slice | chips / hosts | stage | HBM GiB / chip | fits | roofline step | collectives | "
           "wall time of its epochs | largest batch / chip | 1x H100 / H200 (estimate) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for run in report["runs"]:
    d = run["derived"] or {"stages": {}}
    for s in run["stages"]:
      e = d["stages"][s["stage"]]
      gpu = e["gpu_estimate"]
      lines.append(
          f"| {run['setting']} (batch {run['global_batch']}) | {run['topology']} | {run['chips']} / {run['hosts']} | "
          f"{s['stage']}{' (effort %g)' % s['compile_effort'] if s.get('compile_effort') else ''} | "
          f"{e['hbm_gib']:.2f} | {'yes' if e['fits'] else 'no'} | {e['roofline_s'] * 1e3:.1f} ms"
          f"{' (XLA)' if e['roofline_source'] == 'compiler' else ''} | "
          f"{e['collective_share']:.0%} | {e['wall_h']:.1f} h ({EPOCHS[s['stage']]} ep.) | "
          f"{e['largest_per_chip_batch'] if e['largest_per_chip_batch'] is not None else '-'} | "
          f"{gpu['h100']['wall_h']:.1f} / {gpu['h200']['wall_h']:.1f} h |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default=",".join(SETTINGS), help=f"settings: {','.join(SETTINGS)}")
  ap.add_argument("--topologies", default=",".join(TOPOLOGIES.values()),
                  help=f"topologies ({', '.join(f'{k} = {v}' for k, v in TOPOLOGIES.items())})")
  ap.add_argument("--runs-dir", default="benchmarks/results/pod_compile_runs", help="one JSON per setting and topology")
  ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per compile process")
  ap.add_argument("--programs", default="1,2,3", help="stages to compile (each run's JSON keeps what it has)")
  ap.add_argument("--compile-effort", type=float, default=0.0, help="`erasablemask compile --compile-effort`: -1 "
                  "compiles 2-4x as fast (each stage's entry and the table say so)")
  ap.add_argument("--summary-only", action="store_true")
  ap.add_argument("--out", default="benchmarks/results/pod_compile.json")
  args = ap.parse_args(argv)
  # The compiles run in child processes; this one only reads and writes JSON (its machine line included).
  aot.keep_host_on_cpu()
  settings, topologies = args.only.split(","), args.topologies.split(",")
  unknown = [s for s in settings if s not in SETTINGS]
  if unknown:
    ap.error(f"--only: unknown {unknown}; choose from {list(SETTINGS)}")
  runs_dir = pathlib.Path(args.runs_dir)
  runs_dir.mkdir(parents=True, exist_ok=True)
  load = os.getloadavg()
  started = time.perf_counter()
  if not args.summary_only:
    for setting in settings:
      for topology in topologies:
        chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
        batch = BATCH[setting]  # the study's 8 does not divide over 16 chips: one face per chip there
        compile_one(setting, topology, runs_dir, chips if batch % chips else None, args.timeout, args.programs,
                    args.compile_effort)
        write(args, settings, topologies, runs_dir, load)
  report = write(args, settings, topologies, runs_dir, load)
  print(table(report))
  print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
  return 0


def write(args, settings, topologies, runs_dir, load) -> dict:
  report = collect(runs_dir, settings, topologies)
  results.write_report(args.out, "pod_compile", None, report, load)
  return report


if __name__ == "__main__":
  sys.exit(main())
