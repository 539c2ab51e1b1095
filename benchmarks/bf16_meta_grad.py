"""What a faster formulation does to the stage-2 gradients: the same step in float32 (BatchNorms unfolded) and with
`--variant bf16` (bfloat16 FR nets, D and R) or `--variant fold_bn` (the FR nets' BatchNorms folded into their
convolutions, the trainer's default `fr.fold_batchnorm`).

`step_throughput.py --bf16` runs the FR surrogates, D and R in bfloat16 while E_adv, G and the inner SGD step stay
float32; `--fold-bn` computes the same FR functions with fewer operations (equal up to float32 rounding, which the
folded scale `gamma / sqrt(var + eps)` can enlarge for channels of small variance). This script runs one stage-2 step
of each setting from the same state on the same batch (raw gradients captured as in the PyTorch equality check) and
reports the relative L2 error of each network's gradient against the reference, beside the reference's Hessian term
(second- vs first-order E_adv gradient) for scale: an error well below the Hessian term leaves the meta-gradient
meaningful. Not a timing, so it may run on a loaded machine.

    python -m benchmarks.bf16_meta_grad                     # bf16 at the README setting: 128x128, width 16, batch 4
    python -m benchmarks.bf16_meta_grad --variant fold_bn --out benchmarks/results/fold_bn_meta_grad.json
    python -m benchmarks.bf16_meta_grad --image-size 32 --width 8 --layers 3 --batch 2 --lr-inner 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

from benchmarks import results as results_lib
from benchmarks import step_setup as st


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


VARIANTS = ("bf16", "fold_bn")


def measure(settings: st.Settings, kind: str = "meta_auxiliary", variant: str = "bf16") -> dict:
  """Relative L2 errors of the `variant` step's raw gradients (D, E_adv, R) and losses against the float32 step with
  unfolded BatchNorms."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
  f32 = st.Setup(dataclasses.replace(settings, bf16=False, fold_bn=False))
  other = st.Setup(dataclasses.replace(settings, bf16=variant == "bf16", fold_bn=variant == "fold_bn"))
  batch = f32.host_batch()
  m32, g32, _ = f32.stage2_with_grads(kind, batch)
  m16, g16, _ = other.stage2_with_grads(kind, batch)
  _, g_first, _ = f32.stage2_with_grads("first_order", batch)
  row = {"kind": kind, "variant": variant,
         "grad_rel_err": {net: _rel(_flat(g16[net]), _flat(g32[net])) for net in g32},
         "hessian_term_rel_f32": _rel(_flat(g_first["e_adv"]), _flat(g32["e_adv"])),
         "metrics": {k: (float(m32[k]), float(m16[k])) for k in m32}}
  row["loss_max_rel_err"] = max(abs(b - a) / max(abs(a), 1e-12) for a, b in row["metrics"].values())
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--width", type=int, default=16)
  ap.add_argument("--layers", type=int, default=5)
  ap.add_argument("--fc-dim", type=int, default=256)
  ap.add_argument("--fr", default="bundled:mobilefacenet,bundled:mobilefacenet@flip")
  ap.add_argument("--lr-inner", type=float, default=-1.0, help="< 0: the optimiser's lr (the README setting)")
  ap.add_argument("--variant", default="bf16", choices=VARIANTS)
  ap.add_argument("--out", default=results_lib.out_path("bf16_meta_grad.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  settings = st.Settings(image_size=args.image_size, batch=args.batch, width=args.width, layers=args.layers,
                         fc_dim=args.fc_dim, fr=tuple(args.fr.split(",")), lr_inner=args.lr_inner, fold_bn=False)
  row = measure(settings, variant=args.variant)
  for net, err in row["grad_rel_err"].items():
    print(f"grad {net:<6} {args.variant} vs float32 unfolded, relative L2 {err:.2e}")
  print(f"losses: max rel diff {row['loss_max_rel_err']:.2e}; E_adv Hessian term (2nd vs 1st order, float32) "
        f"{row['hessian_term_rel_f32']:.2e}")
  out = results_lib.write_report(args.out, "bf16_meta_grad", argv, {"settings": dataclasses.asdict(settings),
                                                                   "versions": st.versions(), "rows": [row]},
                                  load_start)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
