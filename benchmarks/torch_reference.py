"""The PyTorch reference of the stage-2 step against the JAX step: same losses, gradients and parameters on one batch.

The torch step (`benchmarks/torch_steps.py`: the stage-2 meta-auxiliary step as a PyTorch implementation of the paper
would write it, and our algorithm through torch.func) is built from a `benchmarks.step_setup.Setup`: the same networks
(`benchmarks/torch_attgan.py`, the converter in reverse), weights, surrogates, targets and batch.

Usage (the equality check on one batch; timings are `benchmarks/step_throughput.py --compare-torch`):

    python -m benchmarks.torch_reference [--image-size 64 --batch 2 --width 8 --lr-inner 0.5]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from benchmarks import step_setup
from benchmarks.torch_attgan import TorchSurrogate, build_fr, flax_to_torch_state_dict, fold_batchnorm
from benchmarks.torch_steps import TorchStage2, TorchStage2Best


def to_torch_batch(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """NHWC JAX/numpy batch with images in [-1, 1] (`Setup.model_batch()`) -> NCHW torch tensors."""
  return {"image": torch.from_numpy(np.ascontiguousarray(np.asarray(batch["image"], np.float32).transpose(0, 3, 1, 2))),
          "att_a": torch.from_numpy(np.asarray(batch["att_a"], np.float32)),
          "att_b": torch.from_numpy(np.asarray(batch["att_b"], np.float32))}


FORMULATIONS = ("naive", "best")


def from_setup(setup, kind: str = "meta_auxiliary", formulation: str = "naive", device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> TorchStage2:
  """The torch twin of a `step_throughput.Setup` (same configs, same stage-2 variables, surrogates and targets).

  Args:
    setup: the JAX benchmark setup.
    kind: the attack kind.
    formulation: "naive" (`TorchStage2`, float32) or "best" (`TorchStage2Best`; with the FR nets' BatchNorms folded
      when `setup.settings.fold_bn`, as the JAX step's).
    device: torch device ("cpu", "cuda").
    dtype: the "best" formulation's FR / D / R compute dtype.
  """
  import jax  # pylint: disable=g-import-not-at-top

  state = jax.device_get(setup.stage2_state())
  variables = {name: getattr(state, name).variables for name in ("g", "e_adv", "r", "d")}
  surrogates = []
  for s in setup.surrogates:
    net = build_fr(s.recogniser.card["arch"], jax.device_get(s.variables), s.recogniser.input_size)
    if formulation == "best" and setup.settings.fold_bn:  # folded where the JAX step folds them
      net = fold_batchnorm(net)
    surrogates.append(TorchSurrogate(net, s.recogniser.preprocessing, flip=s.spec.endswith("@flip")))
  if formulation not in FORMULATIONS:
    raise ValueError(f"unknown torch formulation {formulation!r}; choose from {FORMULATIONS}")
  args = (setup.config.model, setup.config.loss, setup.config.optim, len(setup.config.attributes),
          setup.config.image_size, variables, surrogates, jax.device_get(setup.targets), np.asarray(state.adaptive.w))
  if formulation == "best":
    return TorchStage2Best(*args, kind=kind, lr_inner=setup.lr_inner, device=device, dtype=dtype)
  naive = TorchStage2(*args, kind=kind, lr_inner=setup.lr_inner)
  if device != "cpu":
    naive.place(device)
  return naive


def run_step(torch_step: TorchStage2, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
  """One step of either formulation on a CPU NCHW batch; metrics as floats (for checks, not for timing)."""
  return {k: float(v) for k, v in torch_step.step(torch_step.prepare(batch)).items()}


def _grads_numpy(torch_step: TorchStage2, net: str) -> dict[str, np.ndarray]:
  return {k: v.detach().float().cpu().numpy() for k, v in torch_step.last_grads[net].items()}


# ---------------------------------------------------------------------------------------------------------------------
# The equality check.


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare_step(setup, kind: str = "meta_auxiliary", formulation: str = "naive", device: str = "cpu") -> dict[str, Any]:
  """Runs one stage-2 step in JAX and in torch from the same state on the same batch; compares everything.

  The JAX step runs with `optax.chain(capture, adam)`, where `capture` stores the raw gradients in the optimiser
  state, so the gradients of every network are compared directly (not only the Adam-normalised updates).

  Returns:
    `{"metrics": {name: (jax, torch)}, "grad_rel_err": {net: relative L2 error}, "grad_rel_err_first_order":
    torch's first-order vs second-order E_adv gradient (how large a missing Hessian term would look),
    "param_max_abs_err": {net: max |jax - torch| after the Adam step}, "update_rel_err": {net: relative L2 error of
    the Adam update}}`, for the torch `formulation` ("naive" or "best", on `device`). Adam's first update is nearly `lr * sign(grad)`, so a gradient entry at rounding level may
    flip sign: compare updates in L2, not elementwise.
  """
  import jax  # pylint: disable=g-import-not-at-top

  torch_step = from_setup(setup, kind, formulation, device)
  old = {net: {k: p.detach().cpu().clone() for k, p in getattr(torch_step, net).named_parameters()}
         for net in ("d", "e_adv", "r")}
  batch = setup.host_batch()
  jax_metrics, grads, new_state = setup.stage2_with_grads(kind, batch)
  t_metrics = run_step(torch_step, to_torch_batch(setup.model_batch()))
  out = {"metrics": {k: (float(v), t_metrics[k]) for k, v in jax_metrics.items() if k in t_metrics},
         "grad_rel_err": {}, "param_max_abs_err": {}, "update_rel_err": {}}
  for net in ("d", "e_adv", "r"):
    module = getattr(torch_step, net)
    mapped = flax_to_torch_state_dict(module, {"params": grads[net]}, params_only=True)
    t_grads = _grads_numpy(torch_step, net)
    flat_t = np.concatenate([t_grads[k].ravel() for k in sorted(mapped)])
    flat_j = np.concatenate([mapped[k].numpy().ravel() for k in sorted(mapped)])
    out["grad_rel_err"][net] = _rel_err(flat_j, flat_t)
    new_params = flax_to_torch_state_dict(module, {"params": jax.device_get(getattr(new_state, net).params)},
                                          params_only=True)
    tp = {k: v.detach().cpu() for k, v in module.named_parameters()}
    out["param_max_abs_err"][net] = max(float((new_params[k] - tp[k].detach()).abs().max()) for k in new_params)
    delta_j = np.concatenate([(new_params[k] - old[net][k]).numpy().ravel() for k in sorted(new_params)])
    delta_t = np.concatenate([(tp[k].detach() - old[net][k]).numpy().ravel() for k in sorted(new_params)])
    out["update_rel_err"][net] = _rel_err(delta_j, delta_t)
  if kind == "meta_auxiliary":  # what the same check reads when the Hessian term is dropped (torch, first order)
    first = from_setup(setup, "first_order", formulation, device)
    run_step(first, to_torch_batch(setup.model_batch()))
    fo_grads, so_grads = _grads_numpy(first, "e_adv"), _grads_numpy(torch_step, "e_adv")
    fo = np.concatenate([fo_grads[k].ravel() for k in sorted(fo_grads)])
    so = np.concatenate([so_grads[k].ravel() for k in sorted(fo_grads)])
    out["grad_rel_err_first_order"] = _rel_err(fo, so)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description="JAX vs PyTorch stage-2 step: same losses and gradients on one batch")
  ap.add_argument("--image-size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--width", type=int, default=8, help="enc/dec/dis base width")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--fr", default="bundled:mobilefacenet,bundled:mobilefacenet@flip")
  ap.add_argument("--kind", default="meta_auxiliary", choices=("meta_auxiliary", "first_order", "ensemble"))
  ap.add_argument("--lr-inner", type=float, default=0.5,
                  help="large enough that the Hessian term is visible in the gradient")
  ap.add_argument("--formulation", default="naive,best", help=f"comma-separated torch formulations {FORMULATIONS}")
  ap.add_argument("--torch-device", default="cpu", help="torch device (cpu, cuda)")
  args = ap.parse_args(argv)
  for name in args.formulation.split(","):
    if name not in FORMULATIONS:
      ap.error(f"--formulation: unknown {name!r}; choose from {FORMULATIONS}")
  setup = step_setup.Setup(step_setup.Settings(
      image_size=args.image_size, batch=args.batch, width=args.width, layers=args.layers, fc_dim=4 * args.width,
      fr=tuple(args.fr.split(",")), lr_inner=args.lr_inner))
  for name in args.formulation.split(","):
    result = compare_step(setup, args.kind, name, args.torch_device)
    print(f"--- torch {name} formulation vs JAX")
    for k, (a, b) in result["metrics"].items():
      print(f"{k:<12} jax {a:>14.7g}  torch {b:>14.7g}  rel {abs(a - b) / max(abs(b), 1e-12):.1e}")
    print(f"losses: max rel diff {max_rel_metric_diff(result):.2e}")
    for net, err in result["grad_rel_err"].items():
      print(f"grad {net:<6} relative L2 error {err:.2e}   Adam update relative L2 error "
            f"{result['update_rel_err'][net]:.1e}")
    if "grad_rel_err_first_order" in result:
      print(f"(E_adv gradient without the Hessian term differs by {result['grad_rel_err_first_order']:.2e})")
  return 0


def max_rel_metric_diff(result: Mapping[str, Any]) -> float:
  """The largest relative difference of the losses and metrics of a `compare_step` result."""
  return max(abs(a - b) / max(abs(b), 1e-12) for a, b in result["metrics"].values())


if __name__ == "__main__":
  sys.exit(main())
