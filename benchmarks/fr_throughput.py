"""Embeddings per second of each FR architecture: Flax (jitted) vs PyTorch (eager), same weights and inputs; and of
the six real models (`--real`, `shared:NAME`: foamliu, Xiaoccer, MobileFace V2, faceres, faceres-deep, MobileFace V3).

    python -m benchmarks.fr_throughput [--archs mobilefacenet,iresnet50] [--batch 8] [--rounds 5] [--iters 3]
    python -m benchmarks.fr_throughput --archs "" --real all --out benchmarks/results/fr_throughput_real.json

Real models take 112x112 ArcFace crops, as the attack's `arcface112` view gives them (faceres upscales to 224 inside
its preprocessing); each is timed unfolded and with `fold_batchnorm` (the trainer's default) in the same interleaved
rounds, its real weights loaded from the cache (`fr.real_models`). No torch side: three of them are not PyTorch models.

Weights are random (converted from the PyTorch reference models of `benchmarks/torch_nets.py`); the maximum
absolute difference of the L2-normalised embeddings is reported beside the timings. Per architecture, Flax and torch
are timed in `--rounds` interleaved rounds (the order alternating each round; `--iters` calls per framework per round,
their mean time per call is the round's), and each rate is the median over rounds; torch runs on `--threads` threads
(default: all cores, as XLA uses). Prints a table and writes JSON (machine, load average, versions, settings, every
round).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import results
from benchmarks import timing


REAL_MODELS = ("foamliu", "xiaoccer", "mobileface_v2", "faceres", "faceres_deep", "mobileface_v3")
DEFAULT_ARCHS = ("mobilefacenet", "mobilefacenet_sphereface", "iresnet18", "iresnet50", "iresnet100", "ir_50",
                 "ir_se_50", "ir_152", "inception_resnet_v1")


def bench(arch: str, batch: int, iters: int, rounds: int = 1) -> dict:
  """One architecture: compile, check the embeddings agree, then `rounds` interleaved rounds of Flax and torch."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_nets as ref  # pylint: disable=g-import-not-at-top
  from erasablemask_jax import convert, fr  # pylint: disable=g-import-not-at-top
  spec = convert.get_arch(arch)
  model = ref.randomise(ref.build(arch), 0, spec.input_shape)
  rec = fr.from_variables(arch, convert.convert_state_dict(arch, ref.state_dict_numpy(model)))
  h, w, _ = spec.input_shape
  x = np.random.RandomState(0).uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)
  prep = rec.preprocessing
  xt = torch.from_numpy((((x + 1) / 2 - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32))
                        .transpose(0, 3, 1, 2).copy())
  if prep.crop_fraction != (1.0, 1.0):  # feed the Flax side the 112x112 image it crops to 112x96
    x = np.pad(x, ((0, 0), (0, 0), (8, 8), (0, 0)))
  fn = jax.jit(rec.apply_fn)
  t = time.perf_counter()
  e = fn(rec.variables, x).block_until_ready()
  compile_s = time.perf_counter() - t
  with torch.no_grad():
    et = model(xt)
  et = et.numpy() / np.linalg.norm(et.numpy(), axis=1, keepdims=True)

  def run_flax():
    fn(rec.variables, x).block_until_ready()

  def run_torch():
    with torch.no_grad():
      model(xt)

  seconds = timing.rotated_rounds({"flax": run_flax, "torch": run_torch}, rounds, iters)
  flax_s, torch_s = statistics.median(seconds["flax"]), statistics.median(seconds["torch"])
  return {"arch": arch, "batch": batch, "flax_compile_s": compile_s, "flax_emb_per_s": batch / flax_s,
          "torch_emb_per_s": batch / torch_s, "flax_over_torch": torch_s / flax_s,
          "flax_s_per_round": seconds["flax"], "torch_s_per_round": seconds["torch"],
          "max_abs_diff": float(np.abs(np.asarray(e) - et).max())}


def bench_real(name: str, batch: int, iters: int, rounds: int = 1) -> dict:
  """One real model (`shared:NAME`): unfolded and folded Flax, interleaved rounds, on 112x112 crops."""
  from erasablemask_jax import fr  # pylint: disable=g-import-not-at-top
  from erasablemask_jax.fr import real_models  # pylint: disable=g-import-not-at-top
  rec = fr.load(real_models.model_dir(f"shared:{name}"))
  folded = rec.fold_batchnorm()
  x = np.random.RandomState(0).uniform(-1, 1, (batch, 112, 112, 3)).astype(np.float32)
  fns = {"unfolded": (jax.jit(rec.apply_fn), rec.variables), "folded": (jax.jit(folded.apply_fn), folded.variables)}
  compile_s, out = {}, {}
  for key, (fn, variables) in fns.items():
    t = time.perf_counter()
    out[key] = np.asarray(fn(variables, x).block_until_ready())
    compile_s[key] = time.perf_counter() - t
  runs = {key: (lambda fn=fn, v=variables: fn(v, x).block_until_ready()) for key, (fn, variables) in fns.items()}
  seconds = timing.rotated_rounds(runs, rounds, iters)
  med = {k: statistics.median(v) for k, v in seconds.items()}
  return {"model": name, "arch": rec.card["arch"], "input_size": list(rec.input_size), "batch": batch,
          "emb_per_s": batch / med["unfolded"], "folded_emb_per_s": batch / med["folded"],
          "ms_per_image": 1000 * med["unfolded"] / batch, "folded_ms_per_image": 1000 * med["folded"] / batch,
          "compile_s": compile_s, "s_per_round": seconds,
          "folded_max_abs_diff": float(np.abs(out["folded"] - out["unfolded"]).max()),
          "parameters": int(sum(np.size(v) for v in jax.tree.leaves(rec.variables)))}


def main(argv=None) -> int:
  import torch  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="zoo architectures with random weights (\"\": none)")
  p.add_argument("--real", default="", help="real models of ../shared/assets to time as well: 'all' or names from "
                 + ", ".join(REAL_MODELS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=3, help="calls per framework per round")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per architecture")
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
  p.add_argument("--out", default=results.out_path("fr_throughput.json"))
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads or os.cpu_count() or 1)
  load_start = os.getloadavg()
  rows = []
  print(f"torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds x {args.iters} calls")
  print(f"{'arch':28s} {'batch':>5s} {'flax emb/s':>11s} {'torch emb/s':>12s} {'flax/torch':>10s} {'compile s':>10s} "
        f"{'max|diff|':>10s}")
  for arch in [a for a in args.archs.split(",") if a]:
    r = bench(arch, args.batch, args.iters, args.rounds)
    rows.append(r)
    print(f"{arch:28s} {r['batch']:5d} {r['flax_emb_per_s']:11.1f} {r['torch_emb_per_s']:12.1f} "
          f"{r['flax_over_torch']:9.2f}x {r['flax_compile_s']:10.1f} {r['max_abs_diff']:10.2e}", flush=True)
  real_rows = []
  real = REAL_MODELS if args.real == "all" else [m for m in args.real.split(",") if m]
  if real:
    print(f"{'real model':28s} {'input':>9s} {'emb/s':>8s} {'ms/img':>8s} {'folded emb/s':>13s} {'ms/img':>8s}")
  for name in real:
    r = bench_real(name, args.batch, args.iters, args.rounds)
    real_rows.append(r)
    print(f"{name:28s} {'x'.join(map(str, r['input_size'])):>9s} {r['emb_per_s']:8.1f} {r['ms_per_image']:8.1f} "
          f"{r['folded_emb_per_s']:13.1f} {r['folded_ms_per_image']:8.1f}", flush=True)
  info = {"versions": {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()},
          "settings": vars(args), "results": rows, "real_models": real_rows}
  out = results.write_report(args.out, "fr_throughput", argv, info, load_start, torch_threads=torch.get_num_threads())
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
