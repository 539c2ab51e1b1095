"""How precisely float32 determines the meta-auxiliary gradient: the same stage-2 step in float32 and float64.

The PyTorch reference (`torch_reference.py`) matches JAX's losses and D/R gradients to rounding but E_adv's meta-gradient
only to ~2e-2 (relative L2) with MobileFaceNet at an exaggerated inner step. This script runs JAX's own step in float32
and in float64 (`jax_enable_x64`, every state, surrogate and batch array cast) from the same state on the same batch
and reports the relative L2 gap of E_adv's raw gradient, beside the size of the Hessian term (the gap between the
second- and first-order float64 gradients). A float32-vs-float64 gap as large as the JAX-vs-torch one says that gap is
float32 sensitivity of the problem, not a difference between the implementations.

    python -m benchmarks.meta_grad_precision --lr-inner 0.5,0.05     # -> benchmarks/results/meta_grad_precision.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import results as results_lib  # noqa: E402
from benchmarks import step_setup as st  # noqa: E402

from erasablemask_jax.models import ErasableMask  # noqa: E402
from erasablemask_jax.train import steps as steps_lib  # noqa: E402


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
                      else a, tree)


def e_adv_gradient(settings: st.Settings, dtype, kind: str = "meta_auxiliary") -> tuple[np.ndarray, float]:
  """E_adv's raw stage-2 gradient (flattened, float64) and L_adv, computed in `dtype` from the benchmark's state."""
  setup = st.Setup(settings)
  tx = optax.chain(st.capture_grads(), setup.tx)
  state = setup.state(2, tx)  # initialised in float32 either way, so both runs start from the same numbers
  if dtype == jnp.float64:
    setup.config.model.dtype = "float64"
    setup.models = ErasableMask.from_config(setup.config.model, setup.num_attributes)
  args = [_cast(a, dtype) for a in (state, setup.model_batch(), setup.fr_vars, setup.targets)]
  step = jax.jit(functools.partial(steps_lib.stage2_step, setup.step_config(kind, tx)))
  new_state, metrics = step(*args)
  leaves = jax.tree.leaves(new_state.e_adv.opt_state[0])
  if {leaf.dtype for leaf in leaves} != {jnp.dtype(dtype)}:
    raise RuntimeError(f"the {jnp.dtype(dtype).name} step computed gradients in {({l.dtype for l in leaves})}")
  return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in leaves]), float(metrics["e/adv"])


def _rel(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lr-inner", default="0.5,0.05", help="comma-separated inner learning rates")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--width", type=int, default=8)
  ap.add_argument("--layers", type=int, default=3)
  ap.add_argument("--fc-dim", type=int, default=256, help="D's FC width")
  ap.add_argument("--fr", default="bundled:mobilefacenet,bundled:mobilefacenet@flip",
                  help="surrogates, as step_throughput.py's --fr")
  ap.add_argument("--out", default=results_lib.out_path("meta_grad_precision.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  rows = []
  print(f"{'lr_inner':>9} {'f32 vs f64':>11} {'Hessian term':>13} {'L_adv f32':>11} {'L_adv f64':>11}")
  for lr in (float(v) for v in args.lr_inner.split(",")):
    settings = st.Settings(image_size=args.image_size, batch=args.batch, width=args.width, layers=args.layers,
                           fc_dim=args.fc_dim, fr=tuple(args.fr.split(",")), lr_inner=lr)
    g32, l32 = e_adv_gradient(settings, jnp.float32)
    g64, l64 = e_adv_gradient(settings, jnp.float64)
    first64, _ = e_adv_gradient(settings, jnp.float64, "first_order")
    row = {"lr_inner": lr, "f32_vs_f64_rel": _rel(g32, g64), "hessian_term_rel": _rel(first64, g64),
           "l_adv_f32": l32, "l_adv_f64": l64}
    rows.append(row)
    print(f"{lr:>9g} {row['f32_vs_f64_rel']:>11.2e} {row['hessian_term_rel']:>13.2e} {l32:>11.6f} {l64:>11.6f}")
  out = results_lib.write_report(args.out, "meta_grad_precision", argv, {"settings": vars(args), "rows": rows},
                                  load_start)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
