"""becauseofAI/MobileFace `MobileFace_Identification_V2`: a MobileNetV2-style embedder, from its MXNet graph.

The graph (`MobileFace_Identification_V2-symbol.json`), with MXNet's automatic layer names kept as the Flax module
names so that conversion is a suffix table (`erasablemask_jax.convert.mxnet.mxnet_to_flax_flat`):

    (p - 127.5) * 0.0078125                        # inside the graph; here the card's Preprocessing does it
    conv1 3x3/2 (32, with bias) -> bn1 -> ReLU6    # 112 -> 56
    12 inverted residuals, k = 0, 3, 6, ...:
      convolution{k}   1x1 expand (t = 3)  -> batchnorm{k}   -> ReLU6
      convolution{k+1} 3x3 depthwise /s    -> batchnorm{k+1} -> ReLU6
      convolution{k+2} 1x1 project         -> batchnorm{k+2}
      x + that when the block keeps stride 1 (8 residual adds), else just that
    Flatten (of NCHW (128, 4, 4) in MXNet) -> fc5 (2048 -> 256, no bias) -> fc5_bn

Stages (t, c, n, s) = (3, 32, 3, 2) (3, 32, 3, 2) (3, 64, 3, 2) (3, 128, 3, 2): 56 -> 28 -> 14 -> 7 -> 4. ReLU6 is
`_maximum_scalar 0` + `_minimum_scalar 6` in the graph; every BatchNorm has `fix_gamma=False` and MXNet's default
eps 1e-3. 892,384 parameters; input 112x112 RGB, `(pixel - 127.5) / 128`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax.numpy as jnp

from erasablemask_jax.fr.layers import flatten
from erasablemask_jax.fr.layers import relu6
from erasablemask_jax.fr.layers import torch_batch_norm
from erasablemask_jax.fr.layers import torch_conv

SETTING = ((3, 32, 3, 2), (3, 32, 3, 2), (3, 64, 3, 2), (3, 128, 3, 2))
STEM_CHANNELS = 32
EMBEDDING_SIZE = 256
BN_EPS = 1e-3  # MXNet's BatchNorm default (the graph sets none)
FC_INPUT_CHW = (128, 4, 4)  # the map fc5 flattens, for a 112x112 input


def blocks(setting: Sequence[Sequence[int]] = SETTING,
           inp: int = STEM_CHANNELS) -> Iterator[tuple[int, int, int, int, int, bool]]:
  """Yields `(k, inp, hidden, oup, stride, residual)` per inverted residual; `k` numbers its first conv / BN."""
  k = 0
  for t, c, n, s in setting:
    for i in range(n):
      stride = s if i == 0 else 1
      yield k, inp, inp * t, c, stride, stride == 1 and inp == c
      inp = c
      k += 3


def _bn(name: str) -> nn.BatchNorm:
  return torch_batch_norm(BN_EPS, name=name)


class MobileFaceV2(nn.Module):
  """MobileFace V2: input `(N, 112, 112, 3)` RGB normalised `(pixel - 127.5) / 128`; 256-d output (before L2)."""
  setting: Sequence[Sequence[int]] = SETTING
  embedding_size: int = EMBEDDING_SIZE

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = relu6(_bn("bn1")(torch_conv(STEM_CHANNELS, 3, 2, 1, bias=True, name="conv1")(x)))
    for k, _, hidden, oup, stride, residual in blocks(self.setting):
      h = relu6(_bn(f"batchnorm{k}")(torch_conv(hidden, 1, name=f"convolution{k}")(x)))
      h = torch_conv(hidden, 3, stride, 1, groups=hidden, name=f"convolution{k + 1}")(h)
      h = relu6(_bn(f"batchnorm{k + 1}")(h))
      h = _bn(f"batchnorm{k + 2}")(torch_conv(oup, 1, name=f"convolution{k + 2}")(h))
      x = x + h if residual else h
    x = nn.Dense(self.embedding_size, use_bias=False, name="fc5")(flatten(x))
    return _bn("fc5_bn")(x)


def _conv(kernel: int, filters: int, stride: int = 1, pad: int = 0, groups: int = 1,
          no_bias: bool = True) -> dict[str, Any]:
  return {"op": "Convolution", "kernel": (kernel, kernel), "num_filter": filters, "stride": (stride, stride),
          "pad": (pad, pad), "dilate": (1, 1), "num_group": groups, "no_bias": no_bias}


def mxnet_layers(setting: Sequence[Sequence[int]] = SETTING,
                 embedding_size: int = EMBEDDING_SIZE) -> dict[str, dict[str, Any]]:
  """The layers the MXNet graph of this architecture holds, as `convert.mxnet.graph_layers` reports them."""
  bn = {"op": "BatchNorm", "eps": BN_EPS, "fix_gamma": False, "axis": 1}
  layers = {"conv1": _conv(3, STEM_CHANNELS, 2, 1, no_bias=False), "bn1": bn}
  for k, _, hidden, oup, stride, _ in blocks(setting):
    layers.update({f"convolution{k}": _conv(1, hidden), f"batchnorm{k}": bn,
                   f"convolution{k + 1}": _conv(3, hidden, stride, 1, groups=hidden), f"batchnorm{k + 1}": bn,
                   f"convolution{k + 2}": _conv(1, oup), f"batchnorm{k + 2}": bn})
  layers.update({"fc5": {"op": "FullyConnected", "num_hidden": embedding_size, "no_bias": True, "flatten": True},
                 "fc5_bn": bn})
  return layers
