"""FaceNet InceptionResnetV1 as facenet-pytorch defines it (`models/inception_resnet_v1.py`), 160x160 input.

BasicConv2d = conv (no bias, VALID unless padded) -> BatchNorm(eps 1e-3) -> ReLU. Residual blocks compute
`relu(x + scale * conv2d_{1x1}(concat(branches(x))))` (`block8` without the ReLU). Head: global average pool ->
`last_linear` (1792 -> 512, no bias) -> BatchNorm1d `last_bn` (eps 1e-3). The classifier `logits` of the VGGFace2 /
CASIA checkpoints is not part of the embedder and is dropped by the converter.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from erasablemask_jax.fr.layers import max_pool_valid
from erasablemask_jax.fr.layers import torch_batch_norm
from erasablemask_jax.fr.layers import torch_conv

EPS = 1e-3


class BasicConv2d(nn.Module):
  """conv -> BN(eps 1e-3) -> ReLU; submodules `conv`, `bn`."""
  features: int
  kernel: int | Sequence[int]
  stride: int = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = torch_conv(self.features, self.kernel, self.stride, self.padding, name="conv")(x)
    return nn.relu(torch_batch_norm(EPS, name="bn")(x))


class Block35(nn.Module):
  """35x35 block (at 160 input, 17x17): branches 1x1 / 1x1-3x3 / 1x1-3x3-3x3 of 32 channels; 256 channels."""
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x0 = BasicConv2d(32, 1, name="branch0")(x)
    x1 = BasicConv2d(32, 1, name="branch1_0")(x)
    x1 = BasicConv2d(32, 3, 1, 1, name="branch1_1")(x1)
    x2 = BasicConv2d(32, 1, name="branch2_0")(x)
    x2 = BasicConv2d(32, 3, 1, 1, name="branch2_1")(x2)
    x2 = BasicConv2d(32, 3, 1, 1, name="branch2_2")(x2)
    out = torch_conv(256, 1, bias=True, name="conv2d")(jnp.concatenate([x0, x1, x2], axis=-1))
    return nn.relu(out * self.scale + x)


class Block17(nn.Module):
  """17x17 block: branches 1x1 / 1x1-1x7-7x1 of 128 channels; 896 channels."""
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x0 = BasicConv2d(128, 1, name="branch0")(x)
    x1 = BasicConv2d(128, 1, name="branch1_0")(x)
    x1 = BasicConv2d(128, (1, 7), 1, (0, 3), name="branch1_1")(x1)
    x1 = BasicConv2d(128, (7, 1), 1, (3, 0), name="branch1_2")(x1)
    out = torch_conv(896, 1, bias=True, name="conv2d")(jnp.concatenate([x0, x1], axis=-1))
    return nn.relu(out * self.scale + x)


class Block8(nn.Module):
  """8x8 block: branches 1x1 / 1x1-1x3-3x1 of 192 channels; 1792 channels; `no_relu` for the last one."""
  scale: float = 1.0
  no_relu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x0 = BasicConv2d(192, 1, name="branch0")(x)
    x1 = BasicConv2d(192, 1, name="branch1_0")(x)
    x1 = BasicConv2d(192, (1, 3), 1, (0, 1), name="branch1_1")(x1)
    x1 = BasicConv2d(192, (3, 1), 1, (1, 0), name="branch1_2")(x1)
    out = torch_conv(1792, 1, bias=True, name="conv2d")(jnp.concatenate([x0, x1], axis=-1))
    out = out * self.scale + x
    return out if self.no_relu else nn.relu(out)


class Mixed6a(nn.Module):
  """Reduction 256 -> 896 channels, stride 2."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x0 = BasicConv2d(384, 3, 2, name="branch0")(x)
    x1 = BasicConv2d(192, 1, name="branch1_0")(x)
    x1 = BasicConv2d(192, 3, 1, 1, name="branch1_1")(x1)
    x1 = BasicConv2d(256, 3, 2, name="branch1_2")(x1)
    return jnp.concatenate([x0, x1, max_pool_valid(x, 3, 2)], axis=-1)


class Mixed7a(nn.Module):
  """Reduction 896 -> 1792 channels, stride 2."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x0 = BasicConv2d(256, 1, name="branch0_0")(x)
    x0 = BasicConv2d(384, 3, 2, name="branch0_1")(x0)
    x1 = BasicConv2d(256, 1, name="branch1_0")(x)
    x1 = BasicConv2d(256, 3, 2, name="branch1_1")(x1)
    x2 = BasicConv2d(256, 1, name="branch2_0")(x)
    x2 = BasicConv2d(256, 3, 1, 1, name="branch2_1")(x2)
    x2 = BasicConv2d(256, 3, 2, name="branch2_2")(x2)
    return jnp.concatenate([x0, x1, x2, max_pool_valid(x, 3, 2)], axis=-1)


class InceptionResnetV1(nn.Module):
  """facenet-pytorch `InceptionResnetV1(classify=False)` without the final L2 normalisation.

  Input `(N, 160, 160, 3)` standardised as `(pixel - 127.5) / 128`; output the 512-d pre-normalisation embedding.
  """
  embedding_size: int = 512

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = BasicConv2d(32, 3, 2, name="conv2d_1a")(x)
    x = BasicConv2d(32, 3, 1, name="conv2d_2a")(x)
    x = BasicConv2d(64, 3, 1, 1, name="conv2d_2b")(x)
    x = max_pool_valid(x, 3, 2)
    x = BasicConv2d(80, 1, name="conv2d_3b")(x)
    x = BasicConv2d(192, 3, 1, name="conv2d_4a")(x)
    x = BasicConv2d(256, 3, 2, name="conv2d_4b")(x)
    for i in range(5):
      x = Block35(0.17, name=f"repeat_1_{i}")(x)
    x = Mixed6a(name="mixed_6a")(x)
    for i in range(10):
      x = Block17(0.10, name=f"repeat_2_{i}")(x)
    x = Mixed7a(name="mixed_7a")(x)
    for i in range(5):
      x = Block8(0.20, name=f"repeat_3_{i}")(x)
    x = Block8(1.0, no_relu=True, name="block8")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.embedding_size, use_bias=False, name="last_linear")(x)
    return torch_batch_norm(EPS, name="last_bn")(x)
