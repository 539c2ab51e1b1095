"""Training-step throughput of each curriculum step, the cost of each attack variant, and the machine's utilisation.

For stage 1, stage 2 with the meta-auxiliary attack (exact second order), its first-order variant and the ensemble
ablation, and stage 3, each step built and jitted by the trainer's own `erasablemask_jax.train.build` (its shardings
over a `data` mesh axis, the state donated, the uint8 batch prepared inside the step), measures:

  compile time       `jit(step).lower(...).compile()` wall time
  step time          median of `--steps` timed steps after `--warmup` steps, each `block_until_ready`
  images/s           global batch / median step time
  FLOPs per step     XLA's `compiled.cost_analysis()["flops"]` (of the per-device program)
  achieved FLOP/s    FLOPs / median step time, and its fraction of the peak measured in the same run by a large
                     matrix product (`--matmul` x `--matmul`, best of 5)
  memory             device `memory_stats()["peak_bytes_in_use"]` on GPU/TPU, the process's peak RSS on CPU (both
                     cumulative over the run), and XLA's temp buffer size of the step's program

and reports the second-order step's time relative to the first-order and ensemble steps beside the ratio their FLOP
counts predict (a measured ratio more than 1.3x the predicted one means waste in the second-order program).

`--compare-torch` also runs the same stage-2 step in PyTorch eager (`benchmarks/torch_reference.py`: same networks,
weights and batch), alternating JAX and torch rounds so that both see the same machine load, and reports the ratio
(`benchmarks/torch_timing.py`).

    python -m benchmarks.step_throughput --image-size 128 --batch 4 --width 16 --compare-torch
    python -m benchmarks.step_throughput --devices 4 --stages 2:meta_auxiliary   # simulated devices on CPU

Surrogates (`--fr`, comma-separated, K = their number or `--k`): as `benchmarks/step_setup.py` describes
(`bundled:mobilefacenet`, `random:ARCH`, each optionally `@flip`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import results as results_lib
from benchmarks.step_setup import KINDS, Settings, Setup, timed_step, versions
from erasablemask_jax import aot

STAGES = ("1", "2:meta_auxiliary", "2:first_order", "2:ensemble", "3")


# ---------------------------------------------------------------------------------------------------------------------
# Measurements.

def _flops(compiled) -> float:
  return aot.cost(compiled)["flops"]


def peak_memory_bytes() -> dict[str, float]:
  """Device peak bytes in use (GPU/TPU) or this process's peak RSS (CPU); both cumulative over the run."""
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    return {"device_peak_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20}
  return {"rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def measure_matmul_peak(n: int, dtype=jnp.float32, repeats: int = 5) -> dict[str, float]:
  """Best FLOP/s of an `n x n @ n x n` product on the first device (2 n^3 FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - start)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "best_s": min(times), "flops_per_s": 2 * n**3 / min(times)}


def memory_analysis(compiled) -> dict[str, float]:
  """XLA's buffer assignment of a compiled program (`aot.memory_bytes`) in MiB, and XLA's own peak estimate where
  the backend reports one."""
  out = {f"{k}_mib": v / 2**20 for k, v in aot.memory_bytes(compiled).items() if k != "total"}
  peak = getattr(compiled.memory_analysis(), "peak_memory_in_bytes", 0)
  if peak:
    out["peak_mib"] = peak / 2**20
  return out


def measure_step(setup: Setup, stage: int, kind: str | None, warmup: int, steps: int,
                 cold_compile: bool = False) -> dict[str, Any]:
  """Compile time (and, with `cold_compile`, a cold one), XLA's memory analysis, FLOPs, peak memory and
  steady-state times of one step (state donated between steps)."""
  load_before = os.getloadavg()
  compiled, extra, compile_s = setup.compiled(stage, kind)
  cold = {"compile_cold_s": setup.cold_compile_seconds(stage, kind)} if cold_compile else {}
  state = setup.state(stage)
  batch = setup.device_batch()
  memory = memory_analysis(compiled)
  for _ in range(warmup):
    state, _ = timed_step(compiled, state, batch, extra)
  times = []
  for _ in range(steps):
    state, seconds = timed_step(compiled, state, batch, extra)
    times.append(seconds)
  flops = _flops(compiled)
  median = statistics.median(times)
  return {"stage": stage, "kind": kind, "compile_s": compile_s, **cold, "median_s": median, "min_s": min(times),
          "times_s": times, "images_per_s": setup.settings.batch / median, "flops": flops,
          "flops_per_s": flops * setup.settings.devices / median,
          "xla_temp_mib": memory["temp_mib"], "xla_memory": memory, **peak_memory_bytes(),
          "compilation_cache": bool(jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache),
          "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def measure_interleaved(setup: Setup, kinds: list[str], rounds: int, steps: int) -> dict[str, Any]:
  """Steady-state times of the stage-2 `kinds` in alternating rounds (`steps` of each kind per round).

  Their ratios are what the goals compare; alternating puts every kind under the same machine load (a shared CPU
  drifts by tens of percent between the sequential rows above).
  """
  programs = {kind: setup.compiled(2, kind)[:2] for kind in kinds}
  states = {kind: setup.state(2) for kind in kinds}
  batch = setup.device_batch()
  times = {kind: [] for kind in kinds}

  def run(kind):
    compiled, extra = programs[kind]
    states[kind], seconds = timed_step(compiled, states[kind], batch, extra)
    return seconds

  for kind in kinds:  # one warm-up step each
    run(kind)
  for _ in range(rounds):
    for kind in kinds:
      times[kind].extend(run(kind) for _ in range(steps))
  return {"rounds": rounds, "steps": steps, "times_s": times,
          "median_s": {kind: statistics.median(t) for kind, t in times.items()}}


VARIANTS = {
    "linearize": {"primaries": "linearize"},
    "vmap": {"primaries": "vmap"},
    "scan": {"primaries": "scan"},
    "fold_bn": {"fold_bn": True},
    "unfold_bn": {"fold_bn": False},
    "bf16": {"bf16": True},
}


def compare_variants(setup: Setup, names: list[str], rounds: int, steps: int) -> dict[str, Any]:
  """The stage-2 meta-auxiliary step of `setup` and of each variant (`VARIANTS`: another `--primaries`, folded
  BatchNorm, bf16) in alternating rounds of `steps` steps; each variant's median and its time over the base's."""
  setups = {"base": setup, **{n: Setup(dataclasses.replace(setup.settings, **VARIANTS[n])) for n in names}}
  programs = {n: x.compiled(2, "meta_auxiliary") for n, x in setups.items()}
  states = {n: x.state(2) for n, x in setups.items()}
  batches = {n: x.device_batch() for n, x in setups.items()}
  times = {n: [] for n in setups}

  def run(n):
    compiled, extra, _ = programs[n]
    states[n], seconds = timed_step(compiled, states[n], batches[n], extra)
    return seconds

  for n in setups:
    run(n)
  for _ in range(rounds):
    for n in setups:
      times[n].extend(run(n) for _ in range(steps))
  medians = {n: statistics.median(t) for n, t in times.items()}
  return {"rounds": rounds, "steps": steps, "times_s": times, "median_s": medians,
          "over_base": {n: medians[n] / medians["base"] for n in names},
          "compile_s": {n: p[2] for n, p in programs.items()},
          "flops": {n: _flops(p[0]) for n, p in programs.items()},
          "xla_memory": {n: memory_analysis(p[0]) for n, p in programs.items()}}


def _ratio(rows: dict[str, dict], a: str, b: str, interleaved: dict[str, Any] | None = None) -> dict[str, float] | None:
  """Time and FLOP ratios of rows `a` and `b`; the time ratio from the interleaved medians when both were measured."""
  if a not in rows or b not in rows:
    return None
  medians = (interleaved or {}).get("median_s", {})
  ka, kb = a.partition(":")[2], b.partition(":")[2]
  both = ka in medians and kb in medians
  time_ratio = medians[ka] / medians[kb] if both else rows[a]["median_s"] / rows[b]["median_s"]
  flop_ratio = rows[a]["flops"] / rows[b]["flops"]
  return {"time_ratio": time_ratio, "flop_ratio": flop_ratio, "time_over_flop_prediction": time_ratio / flop_ratio,
          "timing": "interleaved" if both else "sequential",
          "sequential_time_ratio": rows[a]["median_s"] / rows[b]["median_s"]}


def _row_name(stage: int, kind: str | None) -> str:
  return f"stage{stage}" + (f":{kind}" if kind else "")


def _write(path, argv, args, settings, setup, device, peak, peak_bf16, rows, ratios, torch_results) -> None:
  body = {
      "versions": versions(),
      "settings": {**dataclasses.asdict(settings), "surrogates": [x.spec for x in setup.surrogates],
                   "lr_inner_used": setup.lr_inner, "warmup": args.warmup, "steps": args.steps,
                   "xla_flags": os.environ.get("XLA_FLAGS", "")},
      "peak_matmul": peak, **({"peak_matmul_bf16": peak_bf16} if peak_bf16 else {}),
      "rows": rows, "ratios": ratios, "torch": torch_results,
  }
  results_lib.write_report(path, "step_throughput", argv, body, device=device.device_kind,
                           num_devices=settings.devices)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4, help="global batch")
  ap.add_argument("--width", type=int, default=16, help="enc_dim = dec_dim = dis_dim (AttGAN's full width: 64)")
  ap.add_argument("--layers", type=int, default=5)
  ap.add_argument("--max-dim", type=int, default=1024)
  ap.add_argument("--fc-dim", type=int, default=256, help="D's FC width (AttGAN: 1024)")
  ap.add_argument("--fr", default="bundled:mobilefacenet,bundled:mobilefacenet@flip",
                  help="surrogates: bundled:NAME or random:ARCH, optionally @flip")
  ap.add_argument("--k", type=int, default=0, help="number of surrogates (0: as many as --fr lists)")
  ap.add_argument("--lr-inner", type=float, default=None, help="inner step (default: the optimiser's learning rate)")
  ap.add_argument("--primaries", default="unrolled")
  ap.add_argument("--noise", action="store_true", help="the default training noise pool on x_adv (JAX rows only)")
  ap.add_argument("--devices", type=int, default=1,
                  help="data-parallel devices; on CPU this many host devices are simulated")
  ap.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--interleave-rounds", type=int, default=3,
                  help="alternating rounds of the stage-2 kinds for their time ratios (0: use the sequential rows)")
  ap.add_argument("--matmul", type=int, default=0, help="matmul side for the peak (0: 2048 on CPU, 8192 else)")
  ap.add_argument("--compare-torch", action="store_true")
  ap.add_argument("--torch-kinds", default="meta_auxiliary", help="stage-2 kinds to compare with torch")
  ap.add_argument("--torch-rounds", type=int, default=3)
  ap.add_argument("--torch-steps", type=int, default=2, help="steps per framework per round")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
  ap.add_argument("--torch-formulations", default="naive,best",
                  help="torch formulations to time: naive (create_graph=True) and/or best (torch.func HVP, "
                       "channels_last, fused Adam)")
  ap.add_argument("--torch-device", default="cpu", help="torch device of the comparison (cpu, cuda): use the device "
                  "JAX runs on")
  ap.add_argument("--bf16", action="store_true",
                  help="FR nets, D and R compute in bfloat16 (E_adv, G and the inner step float32), JAX and torch best")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cold-compile", action="store_true",
                  help="also compile each step with the persistent compilation cache off (compile_cold_s)")
  ap.add_argument("--isolate", action="store_true",
                  help="measure each row in its own subprocess, so its peak RSS is that row's alone")
  ap.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)  # an --isolate child: rows, nothing else
  ap.add_argument("--profile", default="", metavar="DIR",
                  help="profile the stage-2 step of the first --torch-kinds kind (JAX trace, and torch profiler tables "
                       "for --torch-formulations when torch is installed) into DIR; summarise with "
                       "`python -m benchmarks.profile_summary DIR`")
  ap.add_argument("--profile-steps", type=int, default=3)
  ap.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                  help="fold the frozen FR nets' BatchNorms into their convs, as the trainer does by default "
                       "(config.fr.fold_batchnorm; the torch 'best' formulation then folds them too); --no-fold-bn "
                       "keeps them")
  ap.add_argument("--compare-variants", default="",
                  help=f"comma-separated variants of the stage-2 meta-auxiliary step timed against this setting in "
                       f"alternating rounds (--interleave-rounds x --steps): {', '.join(VARIANTS)}")
  ap.add_argument("--xla-cpu-flags", default="", help="appended to XLA_FLAGS before the backend starts (e.g. "
                  "--xla_cpu_use_onednn=true); see --list-xla-cpu-flags and benchmarks/xla_cpu_flags.py")
  ap.add_argument("--list-xla-cpu-flags", action="store_true",
                  help="print the XLA:CPU flags this jaxlib knows (oneDNN, XNNPACK, ...) and exit")
  ap.add_argument("--out", default="benchmarks/step_throughput.json")
  args = ap.parse_args(argv)
  for stage in args.stages.split(","):
    if stage not in STAGES:
      ap.error(f"--stages: unknown {stage!r}; choose from {STAGES}")
  for kind in args.torch_kinds.split(","):
    if kind not in KINDS:
      ap.error(f"--torch-kinds: unknown {kind!r}; choose from {KINDS}")
  for name in filter(None, args.compare_variants.split(",")):
    if name not in VARIANTS:
      ap.error(f"--compare-variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
  for name in args.torch_formulations.split(","):
    if name not in ("naive", "best"):
      ap.error(f"--torch-formulations: unknown {name!r}; choose from naive, best")
  if args.torch_device not in ("cpu", "cuda") and not args.torch_device.startswith("cuda:"):
    ap.error(f"--torch-device: {args.torch_device!r} is neither cpu nor cuda[:N]")
  return args


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.list_xla_cpu_flags:
    from benchmarks import xla_cpu_flags  # pylint: disable=g-import-not-at-top
    xla_cpu_flags.print_discovered()
    return 0
  if args.xla_cpu_flags:  # read when the backend starts, which is below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_cpu_flags}".strip()
  if args.devices > 1 and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu") and jax.config.jax_platforms in (
      None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts; ignored by GPU/TPU
  settings = Settings(image_size=args.image_size, batch=args.batch, width=args.width, layers=args.layers,
                      max_dim=args.max_dim, fc_dim=args.fc_dim, fr=tuple(args.fr.split(",")), k=args.k,
                      lr_inner=args.lr_inner, primaries=args.primaries, noise=args.noise, devices=args.devices,
                      seed=args.seed, bf16=args.bf16, fold_bn=args.fold_bn)
  device = jax.devices()[0]
  setup = Setup(settings)
  n = args.matmul or (2048 if device.platform == "cpu" else 8192)
  peak = measure_matmul_peak(n)
  peak_bf16 = measure_matmul_peak(n, jnp.bfloat16) if device.platform != "cpu" else None
  print(f"{device.device_kind} x{settings.devices} ({device.platform}); peak {n}x{n} f32 matmul "
        f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s; load avg {os.getloadavg()[0]:.1f}")
  print(f"{settings.batch}x{settings.image_size}x{settings.image_size}, width {settings.width}, K="
        f"{len(setup.surrogates)} ({', '.join(x.spec for x in setup.surrogates)})")

  rows: dict[str, dict] = {}
  path = pathlib.Path(args.out)
  header = (f"{'step':<22}{'compile s':>10}{'median s':>10}{'img/s':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'of peak':>8}"
            f"{'mem MiB':>9}{'temp MiB':>9}")
  print(header)
  for entry in args.stages.split(","):
    stage, _, kind = entry.partition(":")
    if args.isolate and not args.row_only:
      r = _isolated_row(argv, entry, path)
    else:
      r = measure_step(setup, int(stage), kind or None, args.warmup, args.steps, args.cold_compile)
    r["fraction_of_peak"] = r["flops_per_s"] / (peak["flops_per_s"] * settings.devices)
    name = _row_name(int(stage), kind or None)
    rows[name] = r
    mem = r.get("rss_peak_mib", r.get("device_peak_mib"))
    print(f"{name:<22}{r['compile_s']:>10.1f}{r['median_s']:>10.3f}{r['images_per_s']:>8.2f}{r['flops'] / 1e9:>9.1f}"
          f"{r['flops_per_s'] / 1e9:>9.1f}{r['fraction_of_peak']:>8.1%}{mem:>9.0f}{r['xla_temp_mib']:>9.0f}"
          + (f"   cold compile {r['compile_cold_s']:.1f} s" if "compile_cold_s" in r else ""))
  if args.row_only:
    _write(path, argv, args, settings, setup, device, peak, peak_bf16, rows, {}, [])
    return 0

  kinds = [name.partition(":")[2] for name in rows if name.startswith("stage2:")]
  interleaved = None
  if len(kinds) > 1 and args.interleave_rounds > 0:
    interleaved = measure_interleaved(setup, kinds, args.interleave_rounds, args.steps)
    print(f"interleaved ({args.interleave_rounds} rounds x {args.steps} steps): " +
          ", ".join(f"{kind} {t:.3f} s" for kind, t in interleaved["median_s"].items()))
  ratios = {"second_over_first_order": _ratio(rows, "stage2:meta_auxiliary", "stage2:first_order", interleaved),
            "second_order_over_ensemble": _ratio(rows, "stage2:meta_auxiliary", "stage2:ensemble", interleaved),
            "first_order_over_ensemble": _ratio(rows, "stage2:first_order", "stage2:ensemble", interleaved),
            "interleaved": interleaved}
  for name, r in ratios.items():
    if r and name != "interleaved":
      print(f"{name:<28} measured {r['time_ratio']:.2f}x ({r['timing']})   FLOP-predicted {r['flop_ratio']:.2f}x   "
            f"measured/predicted {r['time_over_flop_prediction']:.2f}")

  variants = args.compare_variants.split(",") if args.compare_variants else []
  if variants:
    ratios["variants"] = v = compare_variants(setup, variants, max(args.interleave_rounds, 1), args.steps)
    print("variants of stage2:meta_auxiliary (alternating rounds): base " + f"{v['median_s']['base']:.3f} s; " +
          ", ".join(f"{n} {v['median_s'][n]:.3f} s ({v['over_base'][n]:.2f}x)" for n in variants))

  torch_results = []
  _write(path, argv, args, settings, setup, device, peak, peak_bf16, rows, ratios,
         torch_results)  # the JAX rows are kept even if the torch comparison is interrupted
  if args.compare_torch:
    from benchmarks.torch_timing import compare_torch  # pylint: disable=g-import-not-at-top  (torch is optional)

    for kind in args.torch_kinds.split(","):
      c = compare_torch(setup, kind, args.torch_rounds, args.torch_steps, args.warmup, args.torch_threads,
                        tuple(args.torch_formulations.split(",")), args.torch_device)
      torch_results.append(c)
      _write(path, argv, args, settings, setup, device, peak, peak_bf16, rows,
             ratios, torch_results)
      for key, label in (("torch", "PyTorch eager (naive)"), ("torch_best", "PyTorch best")):
        if f"{key}_median_s" in c:
          print(f"stage2:{kind} JAX {c[f'{key}_jax_median_s']:.3f} s  {label} {c[f'{key}_median_s']:.3f} s  "
                f"torch/JAX {c[f'{key}_over_jax']:.2f}x (per round: "
                f"{', '.join(f'{x:.2f}' for x in c[f'{key}_over_jax_per_round'])}; torch {c['torch_device']}, "
                f"threads {c['torch_threads']})")

  if args.profile:
    from benchmarks.torch_timing import profile_stage2  # pylint: disable=g-import-not-at-top

    meta = profile_stage2(setup, args.torch_kinds.split(",")[0], pathlib.Path(args.profile), args.profile_steps,
                          tuple(args.torch_formulations.split(",")) if _have_torch() else (), args.torch_device,
                          args.torch_threads)
    print(f"profiles in {args.profile} (wall s: {meta['wall_s']}); summary: python -m benchmarks.profile_summary "
          f"{args.profile}")

  _write(path, argv, args, settings, setup, device, peak, peak_bf16, rows, ratios,
         torch_results)
  print(f"wrote {path}")
  return 0


def _have_torch() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _isolated_row(argv: list[str], entry: str, path: pathlib.Path) -> dict[str, Any]:
  """Runs this script on the one stage `entry` in a subprocess (same arguments) and returns its row, whose peak RSS
  is then that step's alone."""
  out = path.resolve().with_name(f"{path.stem}.isolated-{entry.replace(':', '-')}.json")
  cmd = [sys.executable, "-m", "benchmarks.step_throughput", *argv, "--stages", entry, "--out", str(out),
         "--row-only", "--interleave-rounds", "0"]
  proc = subprocess.run(cmd, cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"isolated row {entry} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  (row,) = json.loads(out.read_text())["rows"].values()
  out.unlink()
  row["isolated"] = True
  return row


if __name__ == "__main__":
  sys.exit(main())
