"""Headroom: one batched network call for surrogates that share an architecture and weights (a net and its `@flip`).

The README setting attacks the bundled MobileFaceNet twice, plainly and mirrored. The attack evaluates each
surrogate's loss l_k, its input gradient and, per primary, a Hessian-vector product through it, one network call per
surrogate. Two views of one network could share a call: stack `[x, flip(x)]` into one batch of 2B, embed once, and
split the embeddings. Because each half of the stacked batch feeds only its own view's loss, one backward pass gives
each view's own gradient exactly, so the batched form is the same attack, not an approximation.

Before changing the attack's interface for it, this script measures the most it can give: the FR side alone (the
view's resize, the network, the target cosine), for both surrogates, separate (two calls of batch B) against batched
(one call of 2B), for the three things the step does with the FR nets: the forward (`value`), the input gradient
(`grad`, `jax.value_and_grad`) and the forward-over-reverse Hessian-vector product (`hvp`, `jax.jvp` of `jax.grad`).
Both forms run in alternating rounds in one process; the JSON holds every round. With the step's share of FR work
(from the profile) this bounds what batching could save per step.

    python -m benchmarks.batched_surrogates                       # 128x128 faces, batch 4, bundled MobileFaceNet
    python -m benchmarks.batched_surrogates --image-size 32 --batch 2 --rounds 2 --out /tmp/b.json   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import results
from benchmarks import timing
from erasablemask_jax import fr


def losses(recogniser, fold: bool):
  """`(separate, batched)`: each `f(variables, x, targets) -> l_plain + l_flip`, l = 1 - mean cos to the target."""
  net = recogniser.fold_batchnorm() if fold else recogniser
  apply = net.apply_fn

  def separate(variables, x, targets):
    e0, e1 = apply(variables, x), apply(variables, x[:, :, ::-1, :])
    return (1.0 - jnp.mean(e0 @ targets[0])) + (1.0 - jnp.mean(e1 @ targets[1]))

  def batched(variables, x, targets):
    e = apply(variables, jnp.concatenate([x, x[:, :, ::-1, :]]))
    e0, e1 = jnp.split(e, 2)
    return (1.0 - jnp.mean(e0 @ targets[0])) + (1.0 - jnp.mean(e1 @ targets[1]))

  return net.variables, separate, batched


def programs(loss):
  """The three FR-side computations of the attack, as functions of (variables, x, targets, tangent)."""
  grad = jax.grad(loss, argnums=1)
  return {
      "value": lambda v, x, t, d: loss(v, x, t),
      "grad": lambda v, x, t, d: jax.value_and_grad(loss, argnums=1)(v, x, t),
      "hvp": lambda v, x, t, d: jax.jvp(lambda y: grad(v, y, t), (x,), (d,)),
  }


def measure(image_size: int, batch: int, rounds: int, steps: int, fold: bool = True, seed: int = 0) -> dict:
  recogniser = fr.load_bundled("mobilefacenet")
  variables, separate, batched = losses(recogniser, fold)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, image_size, image_size, 3)), jnp.float32)
  tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(2, recogniser.embedding_size)), jnp.float32)
  targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
  rows = {}
  for what in ("value", "grad", "hvp"):
    fns = {form: jax.jit(programs(loss)[what]) for form, loss in (("separate", separate), ("batched", batched))}
    outs = {form: jax.block_until_ready(fn(variables, x, targets, tangent)) for form, fn in fns.items()}
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
              for a, b in zip(jax.tree.leaves(outs["separate"]), jax.tree.leaves(outs["batched"])))
    calls = {form: lambda fn=fn: jax.block_until_ready(fn(variables, x, targets, tangent)) for form, fn in fns.items()}
    times = timing.rotated_rounds(calls, rounds, steps)
    med = {form: statistics.median(v) for form, v in times.items()}
    rows[what] = {"separate_s": med["separate"], "batched_s": med["batched"],
                  "batched_over_separate": med["batched"] / med["separate"], "max_rel_diff": err,
                  "separate_s_per_round": times["separate"], "batched_s_per_round": times["batched"]}
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--steps", type=int, default=3, help="calls per form per round")
  ap.add_argument("--no-fold-bn", action="store_true", help="the unfolded network (the trainer folds by default)")
  ap.add_argument("--out", default=results.out_path("batched_surrogates.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  rows = measure(args.image_size, args.batch, args.rounds, args.steps, fold=not args.no_fold_bn)
  print(f"MobileFaceNet + @flip, {args.batch}x{args.image_size}x{args.image_size}, {args.rounds} alternating rounds")
  print(f"{'FR-side work':<8}{'separate s':>12}{'batched s':>12}{'batched/sep':>13}{'max rel diff':>14}")
  for what, row in rows.items():
    print(f"{what:<8}{row['separate_s']:>12.4f}{row['batched_s']:>12.4f}{row['batched_over_separate']:>12.2f}x"
          f"{row['max_rel_diff']:>14.1e}")
  report = {"versions": {"jax": jax.__version__}, "settings": vars(args), "rows": rows}
  print(f"wrote {results.write_report(args.out, 'batched_surrogates', argv, report, load_start)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
