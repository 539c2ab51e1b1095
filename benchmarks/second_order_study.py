"""When does the meta-auxiliary attack's second-order term matter? Measured on a trained study run's E_adv.

The transfer study found meta_auxiliary and first_order level (black-box cosine +0.0000 [-0.0018, +0.0019]). Eq. 10's
inner step is plain SGD, `theta' = theta - lr_inner * grad L_pri`, while the outer update is Adam, whose step is about
`lr` per parameter whatever the gradient's scale. So the Hessian term `-lr_inner * H_pri grad L_aux` is small exactly
when the inner step is small next to the outer one. For each inner learning rate (multiples of the run's outer `lr`),
on a batch of the run's own training faces, from the trained state (a finished stage 2 of the study):

- `inner_over_outer`: the inner step's size `||lr_inner * grad L_pri_p||` (mean over primaries) over the outer Adam
  step's size `||Adam(g_meta)||`, the latter from the run's own optimiser state;
- `hessian_share`: `||g_meta - g_first_order|| / ||g_meta||`, what the second-order term adds to E_adv's gradient;
- `cos_meta_first_order`, `cos_meta_ensemble`: how far apart the update directions are;
- `lookahead`: mean over primaries of `L_aux_p(theta'_p) - L_aux_p(theta)`: how much the inner step moves the
  auxiliaries' loss at all (zero means the meta-task is the ensemble evaluated twice);

for the run's K surrogates and for its first two (K = 2: each primary has one auxiliary).

    python -m benchmarks.second_order_study runs/transfer_study_k3/stage2_meta_auxiliary_study_bb-mobileface_v3 \\
        --out benchmarks/results/second_order_study.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import results as results_lib
from benchmarks import study_scoring


def _norm(tree) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree))))


def _cos(a, b) -> float:
  dot = sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return float(dot / (_norm(a) * _norm(b) + 1e-30))


def _sub(a, b):
  return jax.tree.map(lambda x, y: x - y, a, b)


def measure(workdir: pathlib.Path, multiples: list[float], batch_size: int, seed: int,
            ks: list[int] | None = None) -> dict:
  """The module docstring's figures for the trained run in `workdir`, for each K in `ks` (the run's first K surrogates;
  default the run's K and 2)."""
  from erasablemask_jax.attack import make_attack
  from erasablemask_jax.data.faces import load_face_splits
  from erasablemask_jax.fr.preprocess import uint8_to_minus1_1
  from erasablemask_jax.fr.surrogates import load_surrogate, target_embeddings
  from erasablemask_jax.train.checkpoint import restore_run
  from erasablemask_jax.train.state import make_optimizer

  config, models, state, step = restore_run(workdir)
  size = int(config.image_size)
  surrogates = [load_surrogate(s, config.fr.input_crop, size, config.fr.get("fold_batchnorm", False))
                for s in config.fr.surrogates]
  splits = load_face_splits(config.data, config.fr, size)
  targets = target_embeddings(surrogates, uint8_to_minus1_1(splits.target))
  rng = np.random.default_rng(seed)
  index = rng.choice(len(splits.train["image"]), batch_size, replace=False)
  x = uint8_to_minus1_1(splits.train["image"][index])
  att_a = jnp.asarray(splits.train["att"][index], jnp.float32)
  att_b = jnp.roll(att_a, 1, axis=0)
  e = state.e_adv
  generate = jax.jit(lambda theta: models.protect(state.g.variables, {"params": theta, "batch_stats": e.batch_stats},
                                                  x, att_b, train_e=True)[0][0])
  lr = float(config.optim.lr)
  tx = make_optimizer(config.optim)
  out = {"run": str(workdir), "step": int(step), "lr": lr, "batch_size": batch_size, "surrogates": list(config.fr.surrogates),
         "rows": []}
  ks = sorted(set(ks or (len(surrogates), 2)), reverse=True)
  if not all(2 <= k <= len(surrogates) for k in ks):
    raise ValueError(f"--ks {ks}: each K must be between 2 and the run's {len(surrogates)} surrogates")
  for k in ks:
    fr_losses = [lambda xa, s=s, t=t: 1.0 - jnp.mean(s.apply(s.variables, xa) @ t)
                 for s, t in zip(surrogates[:k], targets[:k])]
    w = jnp.ones((k,)) if k != len(surrogates) else state.adaptive.w
    losses = lambda theta, fr_losses=fr_losses: jnp.stack([f(generate(theta)) for f in fr_losses])
    loss_at = jax.jit(losses)
    # Each primary's gradient from one compiled Jacobian; lr_inner is an argument, so one compile serves every multiple.
    jacobian = jax.jit(jax.jacrev(losses))(e.params)
    primary_grads = [jax.tree.map(lambda g, p=p: g[p], jacobian) for p in range(k)]
    l0 = loss_at(e.params)
    _, g_ens, _ = jax.jit(lambda t, fr_losses=fr_losses, w=w: make_attack("ensemble")(t, generate, fr_losses, w))(
        e.params)
    attack_grad = {kind: jax.jit(lambda t, lr_inner, kind=kind, fr_losses=fr_losses, w=w: make_attack(
        kind, lr_inner=lr_inner)(t, generate, fr_losses, w)[1]) for kind in ("meta_auxiliary", "first_order")}
    for m in multiples:
      lr_inner = m * lr
      t0 = time.perf_counter()
      g_meta = attack_grad["meta_auxiliary"](e.params, lr_inner)
      g_fo = attack_grad["first_order"](e.params, lr_inner)
      outer, _ = tx.update(g_meta, e.opt_state, e.params)
      inner = [lr_inner * _norm(g) for g in primary_grads]
      lookahead = []
      for p in range(k):
        theta_p = jax.tree.map(lambda a, g: a - lr_inner * g, e.params, primary_grads[p])
        l1 = loss_at(theta_p)
        aux = [q for q in range(k) if q != p]
        lookahead.append(float(jnp.mean(l1[jnp.asarray(aux)] - l0[jnp.asarray(aux)])))
      out["rows"].append({"k": k, "lr_inner_over_lr": m, "lr_inner": lr_inner,
                          "inner_step": float(np.mean(inner)), "outer_step": _norm(outer),
                          "inner_over_outer": float(np.mean(inner)) / _norm(outer),
                          "hessian_share": _norm(_sub(g_meta, g_fo)) / _norm(g_meta),
                          "cos_meta_first_order": _cos(g_meta, g_fo), "cos_meta_ensemble": _cos(g_meta, g_ens),
                          "lookahead": float(np.mean(lookahead)), "seconds": time.perf_counter() - t0})
      print(table_row(out["rows"][-1]), flush=True)
  return out


def table_row(r: dict) -> str:
  return (f"| {r['k']} | {r['lr_inner_over_lr']:g} | {r['inner_over_outer']:.2e} | {r['hessian_share']:.4f} | "
          f"{r['cos_meta_first_order']:.5f} | {r['cos_meta_ensemble']:.4f} | {r['lookahead']:+.2e} |")


HEADER = ("| K | lr_inner / lr | inner / outer step | Hessian share of g_meta | cos(meta, first order) | "
          "cos(meta, ensemble) | L_aux(theta') - L_aux(theta) |\n|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir", help="a study run whose latest checkpoint is in stage 2 or later")
  p.add_argument("--multiples", default="1,10,100,1000", help="lr_inner as multiples of the run's lr")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ks", default="", help="surrogate counts to measure, each the run's first K (default: the run's K "
                                          "and 2)")
  p.add_argument("--out", default=results_lib.out_path("second_order_study.json"))
  args = p.parse_args(argv)
  try:
    multiples = [float(v) for v in args.multiples.split(",") if v]
  except ValueError:
    print(f"error: --multiples {args.multiples!r} is not a comma-separated list of numbers", file=sys.stderr)
    return 2
  workdir = pathlib.Path(args.workdir)
  load_start = os.getloadavg()
  print(HEADER)
  try:
    ks = [int(v) for v in args.ks.split(",") if v] or None
    result = measure(workdir, multiples, args.batch_size, args.seed, ks)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results_lib.write_report(args.out, "second_order_study", argv, result, load_start)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
