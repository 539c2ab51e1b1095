"""Inference BatchNorm folded into the convolution that feeds it, for frozen FR networks.

For a convolution `y = conv(x, K) (+ c)` whose output goes straight into an inference BatchNorm
`z = (y - mean) / sqrt(var + eps) * scale + bias`, per output channel o:

  a_o = scale_o / sqrt(var_o + eps),   K'[..., o] = a_o K[..., o],   c'_o = a_o (c_o - mean_o) + bias_o,

so `z = conv(x, K') + c'`: the BatchNorm's four elementwise passes (and their tangents and transposes inside the
attack's gradients and Hessian-vector products) become one bias add that XLA fuses into the convolution's output.

`fold_batchnorm(module, variables, example)` finds the conv -> BatchNorm pairs by tracing the module once (a
`flax.linen` method interceptor records every conv output and every BatchNorm input; a BatchNorm whose input *is* a
conv output is folded), and returns `(folded_variables, apply)`: `apply(folded_variables, x)` runs the module with the
folded BatchNorms skipped and c' added after their convolutions. Everything else (other BatchNorms, PReLU, the graph)
is unchanged, so `apply(folded, x)` equals `module.apply(variables, x)` up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from erasablemask_jax.fr.layers import DepthwiseConv

Variables = dict[str, Any]
_CONVS = (nn.Conv, DepthwiseConv)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _pop(tree: dict, path: tuple[str, ...]) -> None:
  """Removes `path` from a nested dict, and parents left empty."""
  parents = [tree]
  for key in path[:-1]:
    if key not in parents[-1]:
      return
    parents.append(parents[-1][key])
  parents[-1].pop(path[-1], None)
  for parent, key in zip(reversed(parents[:-1]), reversed(path[:-1])):
    if parent[key]:
      break
    del parent[key]


def _copy(tree: Any) -> Any:
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def conv_batchnorm_pairs(module: nn.Module, variables: Variables,
                         example: jax.Array) -> dict[tuple, tuple[tuple, float]]:
  """`{batchnorm path: (conv path, the BatchNorm's epsilon)}` for every inference BatchNorm applied directly to a
  conv's output."""
  conv_outputs: dict[int, tuple[tuple[str, ...], Any]] = {}
  pairs: dict[tuple, tuple] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__":
      if isinstance(mod, _CONVS):
        conv_outputs[id(out)] = (mod.path, out)  # the array is kept alive, so its id stays unique
      elif isinstance(mod, nn.BatchNorm) and mod.use_running_average and args and id(args[0]) in conv_outputs:
        pairs[mod.path] = (conv_outputs[id(args[0])][0], mod.epsilon)
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(module.apply, variables, example)
  return pairs


def fold_batchnorm(module: nn.Module, variables: Variables,
                   example: jax.Array) -> tuple[Variables, Callable[[Variables, jax.Array], jax.Array]]:
  """Folds each inference BatchNorm that directly follows a convolution into it (see the module docstring).

  Args:
    module: a Flax module applied as `module.apply(variables, x)` (an FR network in inference mode).
    variables: its `{"params", "batch_stats"}`.
    example: an input of the shape it will be applied to (only traced, never run).

  Returns:
    `(folded, apply)`: variables without the folded BatchNorms, with scaled conv kernels and a `"folded_bias"`
    collection holding c' at each folded conv's path; `apply(folded, x)` the module's function of them.
  """
  pairs = conv_batchnorm_pairs(module, variables, example)
  folded = {k: _copy(v) for k, v in variables.items()}
  folded_convs = set()
  for bn_path, (conv_path, eps) in pairs.items():
    stats, bn = _get(variables["batch_stats"], bn_path), _get(variables["params"], bn_path)
    a = bn["scale"] / jnp.sqrt(stats["var"] + eps)
    conv = _get(folded["params"], conv_path)
    _set(folded["params"], conv_path + ("kernel",), conv["kernel"] * a)
    if "bias" in conv:  # the conv adds c' itself
      _set(folded["params"], conv_path + ("bias",), a * (conv["bias"] - stats["mean"]) + bn["bias"])
    else:
      _set(folded.setdefault("folded_bias", {}), conv_path + ("bias",), bn["bias"] - a * stats["mean"])
      folded_convs.add(conv_path)
    _pop(folded["params"], bn_path)
    _pop(folded["batch_stats"], bn_path)
  skipped = set(pairs)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.BatchNorm) and mod.path in skipped:
      return args[0]
    if isinstance(mod, _CONVS) and mod.path in folded_convs:
      return next_fun(*args, **kwargs) + mod.get_variable("folded_bias", "bias")
    return next_fun(*args, **kwargs)

  def apply(folded_variables: Variables, x: jax.Array) -> jax.Array:
    with nn.intercept_methods(interceptor):
      return module.apply(folded_variables, x)

  return folded, apply

