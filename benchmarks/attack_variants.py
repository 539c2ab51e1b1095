"""What each formulation of the meta-auxiliary attack costs: time per call, XLA FLOPs, temporary memory, compile time.

A small AttGAN-like generator (E_adv fused layer by layer with a frozen G_enc, a transposed-conv decoder, train-mode
BatchNorm in E_adv) at 64x64, batch 4, and three small conv FR nets of different architectures fed through a resize to
their own input sizes, as the real zoo is. Variants, all returning L_adv and its gradient w.r.t. E_adv's parameters:

  nested          jax.value_and_grad of the scalar meta-loss with jax.grad inside (reverse over reverse)
  for_unrolled    forward-over-reverse HVP, Python loop over the K primaries  (exact; the default)
  for_linearize   forward-over-reverse, inner gradient and HVP map from one jax.linearize per primary  (exact)
  for_vmap        forward-over-reverse, generator passes batched over the K primaries with vmap  (exact)
  for_scan        forward-over-reverse, lax.scan over the primaries with lax.switch over the FR nets  (exact)
  first_order     the meta-auxiliary loss without the Hessian term (unrolled)
  ensemble        plain mean of the K losses (the paper's ablation)

GFLOPs are XLA's cost analysis of the compiled program; it counts while loops and conditionals by its own rules, so
the figure for for_scan is not comparable with the others. Times are medians over round-robin calls (after a warm-up
call), so load drifting on a shared machine affects every variant alike.

Usage: python -m benchmarks.attack_variants [--size 64 --batch 4 --repeats 10 --out benchmarks/results/attack_variants.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import results as results_lib
from erasablemask_jax import attack


class Encoder(nn.Module):
  """Conv 4x4 stride 2 + BatchNorm (batch statistics) + LeakyReLU(0.2) per layer; returns every layer's output."""

  widths: tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, x):
    feats = []
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (4, 4), strides=2, padding=1, use_bias=False, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=False, name=f"bn{i}")(x)
      x = nn.leaky_relu(x, 0.2)
      feats.append(x)
    return feats


class Decoder(nn.Module):
  """Transposed convs back to the image, with one shortcut from the encoder layer of the same scale."""

  widths: tuple[int, ...] = (32, 16)

  @nn.compact
  def __call__(self, feats):
    x = feats[-1]
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.ConvTranspose(width, (4, 4), strides=(2, 2), name=f"deconv{i}")(x))
      if i == 0:
        x = jnp.concatenate([x, feats[-2]], axis=-1)
    return jnp.tanh(nn.ConvTranspose(3, (4, 4), strides=(2, 2), name="deconv_out")(x))


class FRNet(nn.Module):
  """A small face-embedding net: convs (plain, depthwise-separable or residual), global pool, 64-d embedding."""

  style: str
  width: int = 32

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      if self.style == "separable":
        x = nn.Conv(x.shape[-1], (3, 3), feature_group_count=x.shape[-1], strides=2, name=f"dw{i}")(x)
        x = nn.Conv(self.width * 2**i, (1, 1), name=f"pw{i}")(x)
      else:
        x = nn.Conv(self.width * 2**i, (3, 3), strides=2, name=f"conv{i}")(x)
      x = nn.PReLU(name=f"prelu{i}")(x) if self.style != "residual" else nn.relu(x)
      if self.style == "residual":
        x = x + nn.Conv(x.shape[-1], (3, 3), name=f"res{i}")(nn.relu(x))
    return nn.Dense(64, name="embed")(jnp.mean(x, axis=(1, 2)))


def build_problem(size: int, batch: int, seed: int = 0):
  """theta, generate and the K=3 FR losses of Eq. 9 (cos to a target face), with resizes to each FR input."""
  k = jax.random.split(jax.random.key(seed), 8)
  x_cov = jax.random.uniform(k[0], (batch, size, size, 3), minval=-1, maxval=1)
  x_target = jax.random.uniform(k[1], (1, size, size, 3), minval=-1, maxval=1)
  enc, dec = Encoder(), Decoder()
  enc_vars = enc.init(k[2], x_cov)
  dec_vars = dec.init(k[3], enc.apply(enc_vars, x_cov, mutable=["batch_stats"])[0])
  theta = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(k[4], a.shape), enc_vars["params"])  # E_adv

  def generate(params):
    ft, _ = enc.apply(enc_vars, x_cov, mutable=["batch_stats"])
    perb, _ = enc.apply({"params": params, "batch_stats": enc_vars["batch_stats"]}, x_cov, mutable=["batch_stats"])
    return dec.apply(dec_vars, [0.5 * a + 0.5 * b for a, b in zip(ft, perb)])

  fr_losses = []
  for i, (style, in_size) in enumerate([("plain", 56), ("separable", 48), ("residual", 64)]):
    net = FRNet(style)
    fr_vars = net.init(k[5 + i], jnp.zeros((1, in_size, in_size, 3)))

    def embed(x, net=net, fr_vars=fr_vars, in_size=in_size):
      x = jax.image.resize(x, (x.shape[0], in_size, in_size, 3), "bilinear")
      e = net.apply(fr_vars, x)
      return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    e_target = embed(x_target)
    fr_losses.append(lambda x, embed=embed, e_target=e_target: 1.0 - jnp.mean(embed(x) @ e_target[0]))
  return theta, generate, tuple(fr_losses), jnp.asarray(attack.init_adaptive_weights(3).w)


def variants(generate, fr_losses, lr_inner):
  meta = functools.partial(attack.meta_auxiliary_value_and_grad, generate=generate, fr_losses=fr_losses,
                           lr_inner=lr_inner)
  nested = jax.value_and_grad(functools.partial(attack.meta_auxiliary_loss_nested, generate=generate,
                                                fr_losses=fr_losses, lr_inner=lr_inner))
  return {
      "nested": lambda t, w: nested(t, w=w),
      "for_unrolled": lambda t, w: meta(t, w=w, primaries="unrolled")[:2],
      "for_linearize": lambda t, w: meta(t, w=w, primaries="linearize")[:2],
      "for_vmap": lambda t, w: meta(t, w=w, primaries="vmap")[:2],
      "for_scan": lambda t, w: meta(t, w=w, primaries="scan")[:2],
      "first_order": lambda t, w: meta(t, w=w, first_order=True)[:2],
      "ensemble": lambda t, w: attack.ensemble_value_and_grad(t, generate, fr_losses, w)[:2],
  }


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def compile_variant(fn, args) -> dict:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {
      "compiled": compiled,
      "gflops": (_flops(compiled) or float("nan")) / 1e9,
      "temp_mib": getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20,
      "compile_s": compile_s,
      "value_and_grad": jax.block_until_ready(compiled(*args)),  # also the warm-up call
  }


def time_round_robin(results: dict, args, repeats: int) -> None:
  """Median and min wall time per call; variants take turns so a shared machine's load drifts over all alike."""
  times = {name: [] for name in results}
  for _ in range(repeats):
    for name, r in results.items():
      start = time.perf_counter()
      jax.block_until_ready(r["compiled"](*args))
      times[name].append(time.perf_counter() - start)
  for name, r in results.items():
    r.pop("compiled")
    r["median_ms"] = 1e3 * statistics.median(times[name])
    r["min_ms"] = 1e3 * min(times[name])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--lr-inner", type=float, default=2e-5)
  ap.add_argument("--only", default="", help="comma-separated subset of variants")
  ap.add_argument("--out", default=results_lib.out_path("attack_variants.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()

  theta, generate, fr_losses, w = build_problem(args.size, args.batch)
  chosen = variants(generate, fr_losses, args.lr_inner)
  if args.only:
    chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
  results = {name: compile_variant(fn, (theta, w)) for name, fn in chosen.items()}
  time_round_robin(results, (theta, w), args.repeats)

  print(f"meta-auxiliary attack, K=3, {args.batch}x{args.size}x{args.size}, on {jax.devices()[0].device_kind}")
  print(f"{'variant':<14}{'median ms':>11}{'min ms':>9}{'GFLOPs':>9}{'temp MiB':>10}{'compile s':>11}"
        f"{'rel.err vs nested':>19}")
  rows = {}
  for name, r in results.items():
    value, grad = r.pop("value_and_grad")
    err = float("nan")
    if "nested" in rows and name not in ("first_order", "ensemble"):
      ref_grad = rows["nested"]["grad"]
      flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
      err = float(np.linalg.norm(flat(grad) - flat(ref_grad)) / np.linalg.norm(flat(ref_grad)))
    rows[name] = dict(r, l_adv=float(value), rel_err_vs_nested=err, grad=grad)
    print(f"{name:<14}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['gflops']:>9.2f}{r['temp_mib']:>10.1f}"
          f"{r['compile_s']:>11.1f}{err:>19.2e}")

  for row in rows.values():
    row.pop("grad")
  body = {
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__},
      "settings": {"size": args.size, "batch": args.batch, "repeats": args.repeats, "lr_inner": args.lr_inner,
                   "num_surrogates": len(fr_losses), "theta_params": int(sum(a.size for a in jax.tree.leaves(theta)))},
      "results": rows,
  }
  path = results_lib.write_report(args.out, "attack_variants", argv, body, load_start,
                                  device=jax.devices()[0].device_kind)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
