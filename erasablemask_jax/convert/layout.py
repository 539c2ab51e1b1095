"""PyTorch -> Flax tensor layouts, and the generic state-dict renaming that the architecture specs build on.

Layouts (PyTorch NCHW modules, Flax NHWC modules):
- Conv2d weight `(O, I/groups, kh, kw)` -> Flax `Conv` kernel `(kh, kw, I/groups, O)`: a transpose `(2, 3, 1, 0)`.
  A depthwise conv (`groups = C`, weight `(C*m, 1, kh, kw)`) moves the same way to `(kh, kw, 1, C*m)`, which is what
  `nn.Conv(feature_group_count=C)` holds.
- Linear weight `(out, in)` -> Dense kernel `(in, out)`. When the Linear follows a `torch.flatten` of an NCHW map
  `(C, H, W)`, its input index is `c*H*W + h*W + w` while a Flax flatten of NHWC gives `h*W*C + w*C + c`: the kernel's
  rows are permuted (`linear_after_nchw_flatten`), never the activations.
- BatchNorm `weight, bias, running_mean, running_var` -> `params/scale, params/bias, batch_stats/mean, batch_stats/var`;
  `num_batches_tracked` is dropped.
- Per-channel PReLU `weight (C,)` -> `params/<prelu>/negative_slope (C,)` (see `erasablemask_jax.fr.layers.PReLU`).

Module names: `default_module_path` turns a torch module path into the Flax path used throughout the zoo: numeric
components (Sequential / ModuleList indices) are joined to the preceding name with `_`, so `layer1.0.bn1` ->
`layer1_0/bn1` and `features.3.conv.0.1` -> `features_3/conv_0_1`.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import numpy as np

from erasablemask_jax.convert.rules import Rule
from erasablemask_jax.convert.rules import rename_flat

UNMAPPED = "unmapped"
_BATCH_NORM = (("weight", "params/{}/scale"), ("bias", "params/{}/bias"), ("running_mean", "batch_stats/{}/mean"),
               ("running_var", "batch_stats/{}/var"))


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """Conv2d weight `(O, I/groups, kh, kw)` -> Flax kernel `(kh, kw, I/groups, O)` (depthwise included)."""
  if w.ndim != 4:
    raise ValueError(f"conv weight must be 4-D (O, I, kh, kw), got shape {w.shape}")
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def depthwise_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """Depthwise Conv2d weight `(C*m, 1, kh, kw)` -> Flax kernel `(kh, kw, 1, C*m)` for `feature_group_count=C`."""
  if w.ndim != 4 or w.shape[1] != 1:
    raise ValueError(f"depthwise conv weight must be (C, 1, kh, kw), got shape {w.shape}")
  return conv_oihw_to_hwio(w)


def linear_to_dense(w: np.ndarray) -> np.ndarray:
  """Linear weight `(out, in)` -> Dense kernel `(in, out)`."""
  if w.ndim != 2:
    raise ValueError(f"linear weight must be 2-D (out, in), got shape {w.shape}")
  return np.ascontiguousarray(w.T)


def linear_after_nchw_flatten(w: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
  """Dense kernel for a Linear applied to `torch.flatten(x_nchw, 1)`, when Flax flattens the NHWC map instead.

  Args:
    w: torch Linear weight `(out, C*H*W)`, input index `c*H*W + h*W + w`.
    chw: `(C, H, W)` of the flattened feature map.

  Returns:
    Kernel `(H*W*C, out)` with row `h*W*C + w*C + c` = torch column `c*H*W + h*W + w`.
  """
  c, h, wd = chw
  out = w.shape[0]
  if w.ndim != 2 or w.shape[1] != c * h * wd:
    raise ValueError(f"linear weight {w.shape} does not take a flattened {chw} map")
  return np.ascontiguousarray(w.reshape(out, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, out))


def default_module_path(torch_module: str) -> str:
  """`layer1.0.bn1` -> `layer1_0/bn1`: numeric components join the preceding name with `_`."""
  parts: list[str] = []
  for part in torch_module.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return "/".join(parts)


def torch_rules(state: Mapping[str, np.ndarray],
                module_path: Callable[[str], str] = default_module_path) -> list[Rule]:
  """The rename table of a torch state dict, generated from its tensors (module docstring for the layouts).

  A torch module's kind is read from its tensors: `running_mean` means BatchNorm, a 4-D `weight` a conv, a 2-D one a
  Linear, a lone 1-D `weight` a PReLU. Tensors that fit none of these get no rule.

  Args:
    state: torch state dict (numpy values).
    module_path: maps a torch module path (`layer1.0.bn1`) to its Flax module path (`layer1_0/bn1`).
  """
  modules: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state.items():
    mod, _, leaf = key.rpartition(".")
    modules.setdefault(mod, {})[leaf] = np.asarray(value)
  table = []
  for mod, leaves in modules.items():
    path, prefix = module_path(mod), f"{mod}." if mod else ""
    if "running_mean" in leaves or "running_var" in leaves:
      table += [Rule(prefix + src, dst.format(path)) for src, dst in _BATCH_NORM if src in leaves]
    elif "weight" in leaves and leaves["weight"].ndim in (2, 4):
      kind = "conv" if leaves["weight"].ndim == 4 else "linear"
      table.append(Rule(prefix + "weight", f"params/{path}/kernel", kind))
      if "bias" in leaves:
        table.append(Rule(prefix + "bias", f"params/{path}/bias"))
    elif set(leaves) == {"weight"} and leaves["weight"].ndim == 1:
      table.append(Rule(prefix + "weight", f"params/{path}/negative_slope"))
  return table


def torch_to_flax_flat(
    state: Mapping[str, np.ndarray],
    module_path: Callable[[str], str] = default_module_path,
    ignore: Iterable[str] = (),
) -> dict[str, np.ndarray]:
  """Renames and re-lays a torch state dict into flat Flax variable paths (`collection/a/b/leaf`) by the table
  `torch_rules` generates from it (`rules.rename_flat`).

  Tensors that no rule claims are returned under `unmapped/<torch key>` so that `strict_merge` reports them as
  unexpected instead of silently dropping them; `num_batches_tracked` counters are dropped.

  Args:
    state: torch state dict (numpy values).
    module_path: maps a torch module path (`layer1.0.bn1`) to its Flax module path (`layer1_0/bn1`).
    ignore: regular expressions of torch keys to drop (e.g. a classifier head that is not part of the embedder).

  Returns:
    `{"params/layer1_0/bn1/scale": array, "batch_stats/layer1_0/bn1/mean": array, ...}`.
  """
  ignore = (r".*num_batches_tracked", *ignore)
  patterns = [re.compile(p) for p in ignore]
  kept = {k: v for k, v in state.items() if not any(p.fullmatch(k) for p in patterns)}
  return rename_flat(kept, torch_rules(kept, module_path), ignore=())
