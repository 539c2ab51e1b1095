"""MobileFaceNet in the two layouts of the public PyTorch checkpoints.

Both use the bottleneck table (t, c, n, s) = (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2) (2,128,2,1), an inverted
residual `x + pw_linear(dw_{3x3,s}(pw_expand(x)))` when stride 1 and channels are kept, and a global depthwise conv
(GDConv) over the last 7x7 (7x6) map.

- `MobileFaceNetFoamliu` (foamliu/MobileFaceNet, 112x112, ImageNet mean/std): ReLU6 activations, a depthwise-separable
  `dw_conv` with plain ReLU, `gdconv` then `conv3` (1x1 with bias) then BatchNorm `bn` -> 128-d.
- `MobileFaceNetSphereFace` (Xiaoccer/MobileFaceNet_Pytorch, 112x96, (x-127.5)/128): per-channel PReLU, `linear7`
  (7x6 GDConv + BN) and `linear1` (1x1 + BN) -> 128-d.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from erasablemask_jax.fr.layers import PReLU, relu6
from erasablemask_jax.fr.layers import flatten
from erasablemask_jax.fr.layers import torch_batch_norm
from erasablemask_jax.fr.layers import torch_conv

BOTTLENECK_SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def _blocks(setting: Sequence[Sequence[int]], inp: int = 64):
  """Yields `(index, inp, oup, stride, expansion)` for every bottleneck."""
  index = 0
  for t, c, n, s in setting:
    for i in range(n):
      yield index, inp, c, (s if i == 0 else 1), t
      inp = c
      index += 1


class InvertedResidualFoamliu(nn.Module):
  """foamliu `InvertedResidual`: `conv_0_*` 1x1 expand+BN+ReLU6, `conv_1_*` 3x3 dw+BN+ReLU6, `conv_2`/`conv_3`."""
  inp: int
  oup: int
  stride: int
  expand_ratio: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    hidden = int(round(self.inp * self.expand_ratio))
    h = x
    if self.expand_ratio != 1:
      h = relu6(torch_batch_norm(name="conv_0_1")(torch_conv(hidden, 1, name="conv_0_0")(h)))
      dw, pw, bn = "conv_1_0", "conv_2", "conv_3"
      dw_bn = "conv_1_1"
    else:
      dw, dw_bn, pw, bn = "conv_0_0", "conv_0_1", "conv_1", "conv_2"
    h = relu6(torch_batch_norm(name=dw_bn)(torch_conv(hidden, 3, self.stride, 1, groups=hidden, name=dw)(h)))
    h = torch_batch_norm(name=bn)(torch_conv(self.oup, 1, name=pw)(h))
    return x + h if self.stride == 1 and self.inp == self.oup else h


class DepthwiseSeparableConv(nn.Module):
  """foamliu `DepthwiseSeparableConv`: relu(bn1(depthwise(x))) -> relu(bn2(pointwise(.)))."""
  channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.relu(torch_batch_norm(name="bn1")(torch_conv(self.channels, 3, 1, 1, groups=self.channels,
                                                        name="depthwise")(x)))
    return nn.relu(torch_batch_norm(name="bn2")(torch_conv(self.channels, 1, name="pointwise")(x)))


class GDConv(nn.Module):
  """foamliu `GDConv`: depthwise conv over the whole map (no padding) then BN."""
  channels: int
  kernel: Sequence[int]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return torch_batch_norm(name="bn")(torch_conv(self.channels, self.kernel, groups=self.channels,
                                                  name="depthwise")(x))


class MobileFaceNetFoamliu(nn.Module):
  """foamliu `MobileFaceNet()`: input `(N, 112, 112, 3)` ImageNet-normalised RGB; 128-d output."""
  setting: Sequence[Sequence[int]] = BOTTLENECK_SETTING
  embedding_size: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = relu6(torch_batch_norm(name="conv1_1")(torch_conv(64, 3, 2, 1, name="conv1_0")(x)))
    x = DepthwiseSeparableConv(64, name="dw_conv")(x)
    oup = 64
    for index, inp, oup, stride, t in _blocks(self.setting):
      x = InvertedResidualFoamliu(inp, oup, stride, t, name=f"features_{index}")(x)
    x = relu6(torch_batch_norm(name="conv2_1")(torch_conv(512, 1, name="conv2_0")(x)))
    x = GDConv(512, (x.shape[1], x.shape[2]), name="gdconv")(x)
    x = torch_conv(self.embedding_size, 1, bias=True, name="conv3")(x)
    return flatten(torch_batch_norm(name="bn")(x))


class ConvBlock(nn.Module):
  """Xiaoccer `ConvBlock`: conv (`conv`) -> BN (`bn`) -> per-channel PReLU (`prelu`) unless `linear`."""
  features: int
  kernel: int | Sequence[int]
  stride: int = 1
  padding: int = 0
  depthwise: bool = False
  linear: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    groups = x.shape[-1] if self.depthwise else 1
    x = torch_batch_norm(name="bn")(torch_conv(self.features, self.kernel, self.stride, self.padding, groups=groups,
                                               name="conv")(x))
    return x if self.linear else PReLU(name="prelu")(x)


class BottleneckSphereFace(nn.Module):
  """Xiaoccer `Bottleneck`: `conv_0..2` 1x1 expand+BN+PReLU, `conv_3..5` dw 3x3+BN+PReLU, `conv_6..7` 1x1+BN."""
  inp: int
  oup: int
  stride: int
  expansion: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    hidden = self.inp * self.expansion
    h = PReLU(name="conv_2")(torch_batch_norm(name="conv_1")(torch_conv(hidden, 1, name="conv_0")(x)))
    h = torch_conv(hidden, 3, self.stride, 1, groups=hidden, name="conv_3")(h)
    h = PReLU(name="conv_5")(torch_batch_norm(name="conv_4")(h))
    h = torch_batch_norm(name="conv_7")(torch_conv(self.oup, 1, name="conv_6")(h))
    return x + h if self.stride == 1 and self.inp == self.oup else h


class MobileFaceNetSphereFace(nn.Module):
  """Xiaoccer `MobileFacenet()`: input `(N, 112, 96, 3)` normalised `(pixel - 127.5) / 128`; 128-d output."""
  setting: Sequence[Sequence[int]] = BOTTLENECK_SETTING
  embedding_size: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = ConvBlock(64, 3, 2, 1, name="conv1")(x)
    x = ConvBlock(64, 3, 1, 1, depthwise=True, name="dw_conv1")(x)
    for index, inp, oup, stride, t in _blocks(self.setting):
      x = BottleneckSphereFace(inp, oup, stride, t, name=f"blocks_{index}")(x)
    x = ConvBlock(512, 1, name="conv2")(x)
    x = ConvBlock(512, (x.shape[1], x.shape[2]), depthwise=True, linear=True, name="linear7")(x)
    x = ConvBlock(self.embedding_size, 1, linear=True, name="linear1")(x)
    return flatten(x)
