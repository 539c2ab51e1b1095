"""MXNet checkpoints with numpy alone: the `.params` reader (`mxnet_params`), the `-symbol.json` graph and its checks
(`mxnet_symbol`), and, here, the rename table to Flax variables.

The converter reads a checkpoint through the names imported below (`read_ndarray_list`, `read_symbol`,
`check_params_match_symbol`, ...), wherever they are defined.

Rename (`mxnet_to_flax_flat`), with Flax module names equal to the MXNet layer names:

    arg:X_weight (4-D, OIHW)   -> params/X/kernel (HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, 1, C))
    arg:X_weight (2-D)         -> params/X/kernel (transposed; after an NCHW Flatten its rows are permuted)
    arg:X_bias                 -> params/X/bias
    arg:X_gamma / arg:X_beta   -> params/X/scale / params/X/bias
    aux:X_moving_mean / _var   -> batch_stats/X/mean / batch_stats/X/var
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from erasablemask_jax.convert.layout import UNMAPPED
from erasablemask_jax.convert.layout import conv_oihw_to_hwio
from erasablemask_jax.convert.layout import linear_after_nchw_flatten
from erasablemask_jax.convert.layout import linear_to_dense
from erasablemask_jax.convert.mxnet_params import is_params_file  # noqa: F401
from erasablemask_jax.convert.mxnet_params import read_ndarray_list  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import SymbolGraph  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import check_layers  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import check_params_match_symbol  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import graph_layers  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import infer_param_shapes  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import read_symbol  # noqa: F401
from erasablemask_jax.convert.mxnet_symbol import symbol_path_for  # noqa: F401

_SUFFIXES = (("arg", "_weight", "params/{}/kernel"), ("arg", "_bias", "params/{}/bias"),
             ("arg", "_gamma", "params/{}/scale"), ("arg", "_beta", "params/{}/bias"),
             ("aux", "_moving_mean", "batch_stats/{}/mean"), ("aux", "_moving_var", "batch_stats/{}/var"))


def _rename_one(key: str, value: np.ndarray,
                nchw_flatten: Mapping[str, tuple[int, int, int]]) -> tuple[str, np.ndarray] | None:
  kind, _, name = key.partition(":")
  for want_kind, suffix, dst in _SUFFIXES:
    if kind != want_kind or not name.endswith(suffix) or len(name) == len(suffix):
      continue
    layer = name[:-len(suffix)]
    if suffix == "_weight" and value.ndim == 4:
      return dst.format(layer), conv_oihw_to_hwio(value)
    if suffix == "_weight" and value.ndim == 2:
      chw = nchw_flatten.get(layer)
      if chw is not None and value.shape[1] == int(np.prod(chw)):
        return dst.format(layer), linear_after_nchw_flatten(value, chw)
      return dst.format(layer), linear_to_dense(value)
    return (dst.format(layer), value) if suffix != "_weight" and value.ndim == 1 else None
  return None


def mxnet_to_flax_flat(params: Mapping[str, np.ndarray],
                       nchw_flatten: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, np.ndarray]:
  """`{"arg:conv1_weight": ...}` -> `{"params/conv1/kernel": ...}` by the suffix table in the module docstring.

  Args:
    params: the `.params` arrays.
    nchw_flatten: `{layer: (C, H, W)}` for FullyConnected layers that follow a Flatten of an NCHW map: their kernel
      rows are permuted to the NHWC flatten order (`linear_after_nchw_flatten`).

  Returns:
    Flat Flax variables; keys that fit no rule (or have the wrong rank for it) come back under `unmapped/<key>` so
    that `strict_merge` reports them as unexpected.
  """
  flat: dict[str, np.ndarray] = {}
  for key, value in params.items():
    renamed = _rename_one(key, np.asarray(value), nchw_flatten or {})
    if renamed is None or renamed[0] in flat:
      flat[f"{UNMAPPED}/{key}"] = np.asarray(value)
    else:
      flat[renamed[0]] = renamed[1]
  return flat
