"""IR and IR-SE ResNets of face.evoLVe / InsightFace_Pytorch (`model_irse.py`: `IR_50`, `IR_SE_152`, ...).

Parameter paths follow the PyTorch keys (`input_layer_0`, `body_17/res_layer_3`, `body_0/shortcut_layer_1`,
`output_layer_3`). Unit:

    res(x) = [SE](BN(conv_{3x3, stride}(PReLU(conv_{3x3}(BN(x))))))
    shortcut(x) = MaxPool2d(1, stride)(x) = x[:, ::stride, ::stride]   when in_channel == depth,
                  BN(conv_{1x1, stride}(x))                            otherwise
    SE(r) = r * sigmoid(fc2(relu(fc1(mean_hw(r)))))   (1x1 convs without bias, reduction 16)

Head (`output_layer`): BN -> Dropout (identity here) -> flatten 512x7x7 -> Linear -> BatchNorm1d.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from erasablemask_jax.fr.layers import PReLU
from erasablemask_jax.fr.layers import flatten
from erasablemask_jax.fr.layers import torch_batch_norm
from erasablemask_jax.fr.layers import torch_conv

IR_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}


class SEModule(nn.Module):
  """Squeeze-and-excitation with 1x1 convs `fc1` (C -> C/r) and `fc2` (C/r -> C), no bias."""
  channels: int
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(torch_conv(self.channels // self.reduction, 1, name="fc1")(s))
    s = nn.sigmoid(torch_conv(self.channels, 1, name="fc2")(s))
    return x * s


class BottleneckIR(nn.Module):
  """`bottleneck_IR` (se=False) / `bottleneck_IR_SE` (se=True)."""
  in_channel: int
  depth: int
  stride: int
  se: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.in_channel == self.depth:
      shortcut = x[:, ::self.stride, ::self.stride, :]
    else:
      shortcut = torch_conv(self.depth, 1, self.stride, 0, name="shortcut_layer_0")(x)
      shortcut = torch_batch_norm(name="shortcut_layer_1")(shortcut)
    r = torch_batch_norm(name="res_layer_0")(x)
    r = torch_conv(self.depth, 3, 1, 1, name="res_layer_1")(r)
    r = PReLU(name="res_layer_2")(r)
    r = torch_conv(self.depth, 3, self.stride, 1, name="res_layer_3")(r)
    r = torch_batch_norm(name="res_layer_4")(r)
    if self.se:
      r = SEModule(self.depth, 16, name="res_layer_5")(r)
    return r + shortcut


class IRBackbone(nn.Module):
  """face.evoLVe `Backbone(input_size=[112, 112], num_layers, mode)`. Input `(N, 112, 112, 3)` in [-1, 1]."""
  units: Sequence[int]
  se: bool = False
  embedding_size: int = 512

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = torch_conv(64, 3, 1, 1, name="input_layer_0")(x)
    x = torch_batch_norm(name="input_layer_1")(x)
    x = PReLU(name="input_layer_2")(x)
    index, in_channel = 0, 64
    for depth, n in zip((64, 128, 256, 512), self.units):
      for i in range(n):
        x = BottleneckIR(in_channel, depth, 2 if i == 0 else 1, self.se, name=f"body_{index}")(x)
        in_channel = depth
        index += 1
    x = torch_batch_norm(name="output_layer_0")(x)
    x = nn.Dense(self.embedding_size, name="output_layer_3")(flatten(x))
    return torch_batch_norm(name="output_layer_4")(x)
