"""How the JAX stage-2 (meta-auxiliary) step's cost grows with image size, width and batch, with fitted exponents.

Each point is `step_throughput.py --stages 2:meta_auxiliary` in its own process (so each point's peak RSS is its own),
at the README setting (128x128, width 16, batch 4, D FC 16 x width, MobileFaceNet + flip) with one axis changed:
image size 64/128/256, width 16/32/64, batch 1/4/16 (`--grid` runs all 27 combinations instead). For each axis the
exponent b of `cost ~ axis^b` is the least-squares slope of log(cost) on log(axis) (with `--grid`, one joint fit
log t = c + b_s log size + b_w log width + b_b log batch), for the median step time and for XLA's FLOP count. Writes
JSON and a log-log plot (PNG) beside it.

    python -m benchmarks.cost_sweep                                   # 9 points (7 distinct), 5.2 min on 2 cores
    python -m benchmarks.cost_sweep --sizes 16,32 --widths 4,8 --batches 1,2 --layers 3 --fr tiny,tiny@flip   # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import results as results_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
AXES = ("image_size", "width", "batch")


def measure_point(image_size: int, width: int, batch: int, args) -> dict:
  """One stage-2 meta-auxiliary row of step_throughput.py, run in a subprocess."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "row.json"
    cmd = [sys.executable, "-m", "benchmarks.step_throughput", "--stages", "2:meta_auxiliary", "--row-only",
           "--interleave-rounds", "0", "--image-size", str(image_size), "--width", str(width), "--batch", str(batch),
           "--fc-dim", str(args.fc_per_width * width), "--layers", str(args.layers), "--fr", args.fr,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--matmul", str(args.matmul), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      return {"image_size": image_size, "width": width, "batch": batch, "error": proc.stderr[-2000:]}
    report = json.loads(out.read_text())
  (row,) = report["rows"].values()
  return {"image_size": image_size, "width": width, "batch": batch, "median_s": row["median_s"],
          "flops": row["flops"], "compile_s": row["compile_s"], "rss_peak_mib": row.get("rss_peak_mib"),
          "xla_memory": row.get("xla_memory"), "peak_matmul_flops_per_s": report["peak_matmul"]["flops_per_s"]}


def fit_axis(points: list[dict], axis: str, key: str) -> float:
  """Least-squares slope of log(point[key]) on log(point[axis])."""
  x = np.log([p[axis] for p in points])
  y = np.log([p[key] for p in points])
  return float(np.polyfit(x, y, 1)[0])


def fit_joint(points: list[dict], key: str) -> dict[str, float]:
  """log(key) = c + sum_axis b_axis log(axis), least squares over all points."""
  a = np.column_stack([np.ones(len(points))] + [np.log([p[ax] for p in points]) for ax in AXES])
  coef, *_ = np.linalg.lstsq(a, np.log([p[key] for p in points]), rcond=None)
  return {"const": float(coef[0]), **{ax: float(c) for ax, c in zip(AXES, coef[1:])}}


def plot(points: list[dict], fits: dict, base: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(13, 4))
  for ax, axis in zip(axes, AXES):
    line = [p for p in points if all(p[o] == base[o] for o in AXES if o != axis)]
    if len(line) < 2:
      continue
    line.sort(key=lambda p: p[axis])
    xs = np.array([p[axis] for p in line], float)
    for key, label, marker in (("median_s", "step time (s)", "o"), ("flops", "GFLOP / step", "s")):
      ys = np.array([p[key] for p in line]) / (1e9 if key == "flops" else 1.0)
      b = fits[axis][key]
      ax.loglog(xs, ys, marker, label=f"{label}: exponent {b:.2f}")
      ax.loglog(xs, ys[0] * (xs / xs[0]) ** b, "--", color=ax.lines[-1].get_color(), alpha=0.6)
    ax.set_xlabel(axis)
    ax.set_xticks(xs, [str(int(v)) for v in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  fig.suptitle("JAX stage-2 meta-auxiliary step: cost growth (others at " +
               ", ".join(f"{k} {v}" for k, v in base.items()) + ")")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="64,128,256")
  ap.add_argument("--widths", default="16,32,64")
  ap.add_argument("--batches", default="1,4,16")
  ap.add_argument("--base", default="128,16,4", help="image size, width, batch held while another axis varies")
  ap.add_argument("--grid", action="store_true", help="all combinations and one joint fit (27 points by default)")
  ap.add_argument("--layers", type=int, default=5)
  ap.add_argument("--fc-per-width", type=int, default=16, help="D's FC width per unit of width (AttGAN: 1024 / 64)")
  ap.add_argument("--fr", default="bundled:mobilefacenet,bundled:mobilefacenet@flip")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--matmul", type=int, default=0, help="as step_throughput.py (0: its default)")
  ap.add_argument("--out", default=results_lib.out_path("cost_sweep.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  values = {"image_size": [int(v) for v in args.sizes.split(",")], "width": [int(v) for v in args.widths.split(",")],
            "batch": [int(v) for v in args.batches.split(",")]}
  base = dict(zip(AXES, (int(v) for v in args.base.split(","))))
  if args.grid:
    combos = list(itertools.product(*(values[a] for a in AXES)))
  else:
    combos = sorted({tuple(v if a == axis else base[a] for a in AXES) for axis in AXES for v in values[axis]})
  points = []
  print(f"{'size':>5}{'width':>6}{'batch':>6}{'median s':>10}{'GFLOP':>9}{'RSS MiB':>9}")
  for size, width, batch in combos:
    p = measure_point(size, width, batch, args)
    points.append(p)
    if "error" in p:
      print(f"{size:>5}{width:>6}{batch:>6}  failed: {p['error'].strip().splitlines()[-1] if p['error'] else ''}")
    else:
      print(f"{size:>5}{width:>6}{batch:>6}{p['median_s']:>10.3f}{p['flops'] / 1e9:>9.1f}{p['rss_peak_mib'] or 0:>9.0f}",
            flush=True)
  ok = [p for p in points if "error" not in p]
  fits = {}
  for axis in AXES:
    line = [p for p in ok if all(p[o] == base[o] for o in AXES if o != axis)]
    if len(line) >= 2:
      fits[axis] = {key: fit_axis(line, axis, key) for key in ("median_s", "flops")}
      print(f"exponent in {axis:<10}: time {fits[axis]['median_s']:.2f}   FLOPs {fits[axis]['flops']:.2f}")
  joint = {key: fit_joint(ok, key) for key in ("median_s", "flops")} if args.grid and len(ok) > len(AXES) else None
  if joint:
    print("joint fit (time): " + ", ".join(f"{a} {joint['median_s'][a]:.2f}" for a in AXES))
  out = results_lib.write_report(args.out, "cost_sweep", argv, {"settings": {**vars(args), "base": base},
                                                                 "points": points, "exponents": fits,
                                                                 "joint_fit": joint}, load_start)
  if fits:
    plot(ok, fits, base, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
  else:
    print(f"wrote {out}")
  return 0 if len(ok) == len(points) else 1


if __name__ == "__main__":
  sys.exit(main())
