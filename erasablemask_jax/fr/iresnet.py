"""IResNet (insightface `arcface_torch/backbones/iresnet.py`), the ArcFace / CosFace backbone.

Parameter paths follow the PyTorch keys with Sequential indices joined by `_` (`layer3_12/conv2`,
`layer1_0/downsample_0`). Block (pre-activation "improved" residual):

    out = BN3(conv2_{3x3, stride}(PReLU(BN2(conv1_{3x3}(BN1(x)))))) + shortcut(x)
    shortcut(x) = BN(conv_{1x1, stride}(x)) on the first block of each stage, else x.

Head: BN2 -> flatten of the 512x7x7 map -> fc (25088 -> 512) -> BatchNorm1d `features`. The torch flatten is NCHW;
the converter permutes `fc.weight` rows instead of transposing the activations.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from erasablemask_jax.fr.layers import PReLU
from erasablemask_jax.fr.layers import flatten
from erasablemask_jax.fr.layers import torch_batch_norm
from erasablemask_jax.fr.layers import torch_conv

IRESNET_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


class IBasicBlock(nn.Module):
  """arcface_torch `IBasicBlock`."""
  planes: int
  stride: int = 1
  downsample: bool = False
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = torch_batch_norm(self.eps, name="bn1")(x)
    out = torch_conv(self.planes, 3, 1, 1, name="conv1")(out)
    out = torch_batch_norm(self.eps, name="bn2")(out)
    out = PReLU(name="prelu")(out)
    out = torch_conv(self.planes, 3, self.stride, 1, name="conv2")(out)
    out = torch_batch_norm(self.eps, name="bn3")(out)
    if self.downsample:
      x = torch_conv(self.planes, 1, self.stride, 0, name="downsample_0")(x)
      x = torch_batch_norm(self.eps, name="downsample_1")(x)
    return out + x


class IResNet(nn.Module):
  """arcface_torch `IResNet`; `layers` from `IRESNET_LAYERS`. Input `(N, 112, 112, 3)` normalised to [-1, 1]."""
  layers: Sequence[int]
  num_features: int = 512
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = torch_conv(64, 3, 1, 1, name="conv1")(x)
    x = torch_batch_norm(self.eps, name="bn1")(x)
    x = PReLU(name="prelu")(x)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
      for i in range(blocks):
        stride = 2 if i == 0 else 1
        x = IBasicBlock(planes, stride, downsample=(i == 0 and (stride != 1 or inplanes != planes)), eps=self.eps,
                        name=f"layer{stage + 1}_{i}")(x)
        inplanes = planes
    x = torch_batch_norm(self.eps, name="bn2")(x)
    x = nn.Dense(self.num_features, name="fc")(flatten(x))
    return torch_batch_norm(self.eps, name="features")(x)
