"""Runs every benchmark at its documented setting and prints one summary table with each goal and whether it holds.

Needs the `bench` extra for the PyTorch sides (`pip install -e ".[bench]"`: torch 2.13.0 and kornia). Run it on a
quiet machine, from the repository root; each benchmark writes its JSON under `benchmarks/results/` (through
`benchmarks.results`: the machine, the command and the load beside the figures), and this script reads those files
back for the table (so `--summary-only` re-prints the table of an earlier run).

    python -m benchmarks.run_all                 # everything (hours on the 2-core CPU VM; step_cpu128 took 5.6 min)
    python -m benchmarks.run_all --list          # the commands, with rough durations, without running them
    python -m benchmarks.run_all --only step_cpu128,paper_width_b4
    python -m benchmarks.run_all --summary-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/em_jax_cache")}


@dataclasses.dataclass(frozen=True)
class Bench:
  name: str
  module: str
  args: tuple[str, ...]
  out: str  # the JSON it writes, relative to the repository root
  minutes: str  # rough duration on the 2-core CPU VM
  env: tuple[tuple[str, str], ...] = ()

  def command(self) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{self.module}", *self.args]

  def shell(self) -> str:
    env = " ".join(f"{k}={v}" for k, v in self.env)
    return (env + " " if env else "") + "python -m benchmarks." + self.module + " " + " ".join(self.args)


_STEP_README = ("--image-size", "128", "--batch", "4", "--width", "16", "--warmup", "2", "--steps", "5",
                "--interleave-rounds", "4", "--compare-torch", "--torch-kinds", "meta_auxiliary,ensemble",
                "--torch-formulations", "naive,best", "--torch-rounds", "4", "--torch-steps", "2", "--cold-compile",
                "--isolate")


def _paper(batch: int) -> Bench:
  return Bench(f"paper_width_b{batch}", "step_throughput",
               ("--image-size", "128", "--batch", str(batch), "--width", "64", "--fc-dim", "1024",
                "--stages", "2:meta_auxiliary", "--warmup", "1", "--steps", "3", "--interleave-rounds", "0",
                "--compare-torch", "--torch-formulations", "best", "--torch-rounds", "3", "--torch-steps", "1",
                "--out", f"benchmarks/results/step_throughput_cpu128_w64_b{batch}.json"),
               f"benchmarks/results/step_throughput_cpu128_w64_b{batch}.json", "2-3" if batch == 4 else "3-4",
               tuple(CACHE.items()))


BENCHES = (
    Bench("step_cpu128", "step_throughput", _STEP_README + ("--out", "benchmarks/results/step_throughput_cpu128.json"),
          "benchmarks/results/step_throughput_cpu128.json", "5-10", tuple(CACHE.items())),  # run F: 4.7 min
    _paper(4),
    _paper(8),
    Bench("headroom_variants", "step_throughput",
          ("--image-size", "128", "--batch", "4", "--width", "16", "--stages", "2:meta_auxiliary", "--warmup", "2",
           "--steps", "3", "--interleave-rounds", "4", "--no-fold-bn", "--compare-variants", "linearize,fold_bn,bf16",
           "--out", "benchmarks/results/step_throughput_headroom.json"),
          "benchmarks/results/step_throughput_headroom.json", "10-15", tuple(CACHE.items())),
    Bench("xla_cpu_flags", "xla_cpu_flags", ("--rounds", "2", "--out", "benchmarks/results/xla_cpu_flags.json"),
          "benchmarks/results/xla_cpu_flags.json", "20-30"),
    Bench("profile_cpu128", "step_throughput",
          ("--image-size", "128", "--batch", "4", "--width", "16", "--stages", "2:meta_auxiliary", "--warmup", "1",
           "--steps", "2", "--interleave-rounds", "0", "--torch-formulations", "naive,best",
           "--profile", "benchmarks/results/profile_cpu128", "--profile-steps", "3",
           "--out", "benchmarks/results/step_throughput_profile.json"),
          "benchmarks/results/step_throughput_profile.json", "5-10", tuple(CACHE.items())),
    Bench("cost_sweep", "cost_sweep", ("--out", "benchmarks/results/cost_sweep.json"), "benchmarks/results/cost_sweep.json", "5-10",
          tuple(CACHE.items())),
    Bench("bf16_meta_grad", "bf16_meta_grad", ("--out", "benchmarks/results/bf16_meta_grad.json"),
          "benchmarks/results/bf16_meta_grad.json", "3-6", tuple(CACHE.items())),
    Bench("fold_bn_meta_grad", "bf16_meta_grad",
          ("--variant", "fold_bn", "--out", "benchmarks/results/fold_bn_meta_grad.json"),
          "benchmarks/results/fold_bn_meta_grad.json", "2-4", tuple(CACHE.items())),
    Bench("batched_surrogates", "batched_surrogates", ("--out", "benchmarks/results/batched_surrogates.json"),
          "benchmarks/results/batched_surrogates.json", "2-4", tuple(CACHE.items())),
    Bench("jpeg_throughput", "jpeg_throughput", ("--out", "benchmarks/results/jpeg_throughput.json"),
          "benchmarks/results/jpeg_throughput.json", "3-5"),
    Bench("fr_throughput", "fr_throughput", ("--out", "benchmarks/results/fr_throughput.json"),
          "benchmarks/results/fr_throughput.json", "10-20"),
    Bench("attack_variants", "attack_variants", ("--out", "benchmarks/results/attack_variants.json"),
          "benchmarks/results/attack_variants.json", "10-15", tuple(CACHE.items())),
    Bench("meta_grad_precision", "meta_grad_precision", ("--out", "benchmarks/results/meta_grad_precision.json"),
          "benchmarks/results/meta_grad_precision.json", "3-6", tuple(CACHE.items())),
    Bench("data_throughput", "data_throughput", ("--batches", "20", "--out", "benchmarks/results/data_throughput.json"),
          "benchmarks/results/data_throughput.json", "1-2"),
    Bench("metrics_baselines", "metrics_baselines", ("--out", "benchmarks/results/metrics_baselines.json"),
          "benchmarks/results/metrics_baselines.json", "5-10"),
    Bench("alignment_accuracy", "alignment_accuracy", ("--out", "benchmarks/results/alignment_accuracy.json"),
          "benchmarks/results/alignment_accuracy.json", "5-10"),  # needs ../shared/assets
    Bench("fr_throughput_real", "fr_throughput", ("--archs", "", "--real", "all", "--out",
                                                  "benchmarks/results/fr_throughput_real.json"),
          "benchmarks/results/fr_throughput_real.json", "3-6"),
    Bench("real_fr_models", "real_fr_models", ("--store", "--out", "benchmarks/results/real_fr_models.json"),
          "benchmarks/results/real_fr_models.json", "30-45"),
)


# ---------------------------------------------------------------------------------------------------------------------
# Goals: (description, value from the JSON, threshold, "ge" / "le").

@dataclasses.dataclass(frozen=True)
class Goal:
  bench: str
  what: str
  value: Callable[[dict], float | None]
  threshold: float
  op: str = "ge"

  def check(self, report: dict | None) -> tuple[float | None, str]:
    try:
      v = self.value(report) if report is not None else None
    except (KeyError, IndexError, TypeError, StopIteration):
      v = None
    if v is None:
      return None, "not measured"
    ok = v >= self.threshold if self.op == "ge" else v <= self.threshold
    return v, "holds" if ok else "FAILS"


def _torch_row(report: dict, kind: str = "meta_auxiliary") -> dict:
  return next(r for r in report["torch"] if r["kind"] == kind)


GOALS = (
    Goal("step_cpu128", "JAX >= 1.3x best torch (meta-auxiliary, README setting)",
         lambda r: _torch_row(r)["torch_best_over_jax"], 1.3),
    Goal("step_cpu128", "JAX >= 1.3x the faster torch formulation (README setting)",
         lambda r: _torch_row(r)["torch_fastest_over_jax"], 1.3),
    Goal("step_cpu128", "JAX >= 1.3x naive torch (meta-auxiliary, README setting)",
         lambda r: _torch_row(r)["torch_over_jax"], 1.3),
    Goal("step_cpu128", "second order <= 1.5x first order (interleaved)",
         lambda r: r["ratios"]["second_over_first_order"]["time_ratio"], 1.5, "le"),
    Goal("fold_bn_meta_grad", "folding moves E_adv's gradient <= 0.1x its Hessian term",
         lambda r: r["rows"][0]["grad_rel_err"]["e_adv"] / r["rows"][0]["hessian_term_rel_f32"], 0.1, "le"),
    Goal("paper_width_b4", "JAX >= 1.0x best torch at width 64, batch 4",
         lambda r: _torch_row(r)["torch_best_over_jax"], 1.0),
    Goal("paper_width_b8", "JAX >= 1.0x best torch at width 64, batch 8",
         lambda r: _torch_row(r)["torch_best_over_jax"], 1.0),
)


def _load(path: str) -> dict | None:
  p = ROOT / path
  return json.loads(p.read_text()) if p.is_file() else None


def _info(bench: Bench, report: dict | None) -> str:
  """One line of what else a report says (no goal), for the table."""
  if report is None:
    return ""
  try:
    if bench.name == "headroom_variants":
      v = report["ratios"]["variants"]["over_base"]
      return ", ".join(f"{k} {x:.2f}x of base time" for k, x in v.items())
    if bench.name == "xla_cpu_flags":
      return ", ".join(f"{k.removeprefix('--')} {x['over_base']:.2f}x" for k, x in report["results"].items()
                       if k != "base" and x.get("over_base"))
    if bench.name == "cost_sweep":
      return ", ".join(f"{a} exp {e['median_s']:.2f}" for a, e in report["exponents"].items())
    if bench.name == "batched_surrogates":
      return ", ".join(f"{k} {x['batched_over_separate']:.2f}x" for k, x in report["rows"].items()) + " (batched/separate)"
    if bench.name == "jpeg_throughput":
      v = report["throughput_images_per_s"]
      return ", ".join(f"{k} {v[k + '_fwd_bwd']:.0f}" for k in ("ours_ste", "ours_cubic", "kornia", "kornia_compiled")
                       if k + "_fwd_bwd" in v) + " img/s fwd+bwd"
    if bench.name == "fr_throughput_real":
      return ", ".join(f"{r['model']} {r['folded_ms_per_image']:.1f}" for r in report["real_models"]) + " ms/img"
    if bench.name == "real_fr_models":
      return ", ".join(f"{n} {r['views']['loose_to_arcface@128']['auc']:.3f}" for n, r in report["models"].items()) \
          + " AUC (study view)"
    if bench.name == "fr_throughput":
      return ", ".join(f"{r['arch']} {r['flax_over_torch']:.2f}x" for r in report["results"]) + " (Flax over torch)"
    if bench.name == "attack_variants":
      rows = report["results"]
      return ", ".join(f"{k} {v['median_ms']:.0f} ms" for k, v in rows.items()) + " per call"
    if bench.name == "meta_grad_precision":
      return ", ".join(f"lr {r['lr_inner']:g}: f32 vs f64 {r['f32_vs_f64_rel']:.1e} (Hessian term "
                       f"{r['hessian_term_rel']:.1e})" for r in report["rows"])
    if bench.name == "data_throughput":
      return ", ".join(f"prefetch {r['prefetch']} {r['images_per_s']:.0f} img/s" for r in report["results"])
    if bench.name == "metrics_baselines":
      a = report["attacks"]
      return (f"PGD ASR {a[next(k for k in a if k.startswith('pgd'))]['asr']:.0%}, LPIPS alex "
              f"{report['lpips_pretrained']['nets']['alex']['ms_per_pair']:.0f} ms/pair")
    if bench.name == "alignment_accuracy":
      marks = ", ".join(f"{r['set']} {r['mean_px']:.2f} px" for r in report["landmarks"])
      return f"{marks}; AUC ours - assets' crops {report['verification']['auc_diff']:+.4f}"
    if bench.name.endswith("_meta_grad"):
      row = report["rows"][0]
      return f"E_adv grad rel. err {row['grad_rel_err']['e_adv']:.2e} (Hessian term {row['hessian_term_rel_f32']:.2e})"
    if bench.name.startswith("step") or bench.name.startswith("paper"):
      row = report["rows"].get("stage2:meta_auxiliary", {})
      return (f"meta-aux {row.get('median_s', float('nan')):.3f} s, "
              f"{row.get('fraction_of_peak', float('nan')):.1%} of matmul peak")
  except (KeyError, IndexError, TypeError):
    return "(unreadable)"
  return "written"


def summary(selected: list[Bench]) -> int:
  names = {b.name for b in selected}
  print(f"\n{'benchmark':<20}{'goal':<60}{'measured':>10}  {'result'}")
  failed = 0
  for goal in GOALS:
    if goal.bench not in names:
      continue
    bench = next(b for b in BENCHES if b.name == goal.bench)
    value, result = goal.check(_load(bench.out))
    failed += result == "FAILS"
    print(f"{goal.bench:<20}{goal.what:<60}{'' if value is None else f'{value:.2f}x':>10}  {result}")
  print(f"\n{'benchmark':<20}{'output':<56}  notes")
  for bench in selected:
    report = _load(bench.out)
    print(f"{bench.name:<20}{bench.out:<56}  {_info(bench, report) if report else 'not run'}")
  return failed


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(b.name for b in BENCHES)}")
  ap.add_argument("--list", action="store_true", help="print each command and its rough duration, run nothing")
  ap.add_argument("--summary-only", action="store_true", help="print the table from the JSON already written")
  args = ap.parse_args(argv)
  selected = list(BENCHES)
  if args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - {b.name for b in BENCHES})
    if unknown:
      ap.error(f"--only: unknown {unknown}; choose from {[b.name for b in BENCHES]}")
    selected = [b for b in BENCHES if b.name in wanted]
  if args.list:
    for b in selected:
      print(f"# {b.name} (~{b.minutes} min)\n{b.shell()}")
    return 0
  if not args.summary_only:
    for b in selected:
      print(f"=== {b.name} (~{b.minutes} min): {b.shell()}", flush=True)
      start = time.time()
      proc = subprocess.run(b.command(), cwd=ROOT, env={**os.environ, **dict(b.env)}, check=False)
      print(f"=== {b.name}: rc {proc.returncode} after {(time.time() - start) / 60:.1f} min", flush=True)
  return 1 if summary(selected) else 0


if __name__ == "__main__":
  sys.exit(main())
