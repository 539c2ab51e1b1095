"""What bfloat16 FR nets, D and R do to the stage-2 gradients: the same step in float32 and with `--bf16`.

`step_throughput.py --bf16` runs the FR surrogates, D and R in bfloat16 while E_adv, G and the inner SGD step stay
float32. This script runs one stage-2 step of each setting from the same state on the same batch (raw gradients
captured as in the PyTorch equality check) and reports the relative L2 error of each network's gradient against
float32, beside the float32 Hessian term (second- vs first-order E_adv gradient) for scale: a bf16 error well below
the Hessian term leaves the meta-gradient meaningful. Not a timing, so it may run on a loaded machine.

    python -m benchmarks.bf16_meta_grad                     # the README setting: 128x128, width 16, batch 4
    python -m benchmarks.bf16_meta_grad --image-size 32 --width 8 --layers 3 --batch 2 --lr-inner 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

from benchmarks import step_throughput as st


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure(settings: st.Settings, kind: str = "meta_auxiliary") -> dict:
  """Relative L2 errors of the bf16 step's raw gradients (D, E_adv, R) and losses against float32."""
  f32 = st.Setup(dataclasses.replace(settings, bf16=False))
  bf16 = st.Setup(dataclasses.replace(settings, bf16=True))
  batch = f32.host_batch()
  m32, g32, _ = f32.stage2_with_grads(kind, batch)
  m16, g16, _ = bf16.stage2_with_grads(kind, batch)
  _, g_first, _ = f32.stage2_with_grads("first_order", batch)
  row = {"kind": kind, "grad_rel_err": {net: _rel(_flat(g16[net]), _flat(g32[net])) for net in g32},
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
  ap.add_argument("--out", default="benchmarks/bf16_meta_grad.json")
  args = ap.parse_args(argv)
  settings = st.Settings(image_size=args.image_size, batch=args.batch, width=args.width, layers=args.layers,
                         fc_dim=args.fc_dim, fr=tuple(args.fr.split(",")), lr_inner=args.lr_inner)
  row = measure(settings)
  for net, err in row["grad_rel_err"].items():
    print(f"grad {net:<6} bf16 vs float32, relative L2 {err:.2e}")
  print(f"losses: max rel diff {row['loss_max_rel_err']:.2e}; E_adv Hessian term (2nd vs 1st order, float32) "
        f"{row['hessian_term_rel_f32']:.2e}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"settings": {**dataclasses.asdict(settings), "command": " ".join(sys.argv)},
                             "versions": st.versions(), "rows": [row]}, indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
