"""Layers shared by the face-recognition zoo, with PyTorch semantics.

- `torch_conv`: `nn.Conv` with PyTorch's explicit symmetric padding. PyTorch pads `p` on both sides; Flax's `"SAME"`
  at stride 2 pads `(0, 1)` on even inputs, which shifts every sampling position by one pixel. Explicit
  `((p, p), (p, p))` padding reproduces PyTorch exactly.
- `torch_batch_norm`: inference BatchNorm `y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`.
- `PReLU`: per-channel `y = max(0, x) + a_c * min(0, x)` (Flax's `nn.PReLU` has one scalar slope).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class DepthwiseConv(nn.Module):
  """Depthwise conv (`groups = in = out channels`) as a sum of shifted products, with `nn.Conv`'s parameters.

  `y[n, i, j, c] = sum_{a, b} xpad[n, s*i + a, s*j + b, c] * kernel[a, b, 0, c] (+ bias[c])`, with symmetric zero
  padding. Same numbers as `nn.Conv(feature_group_count=C)` (kernel `(kh, kw, 1, C)`), but XLA:CPU runs grouped
  convolutions slowly, and this form is fast on every backend.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kh, kw = self.kernel_size
    sh, sw = self.strides
    ph, pw = self.padding
    if x.shape[-1] != self.features:
      raise ValueError(f"depthwise conv expects {self.features} input channels, got {x.shape[-1]}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, 1, self.features), jnp.float32)
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    y = depthwise_taps(xp, kernel[:, :, 0], (sh, sw))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y


def depthwise_taps(xp: jnp.ndarray, kernel: jnp.ndarray, strides: tuple[int, int]) -> jnp.ndarray:
  """Depthwise conv of an already padded NHWC `xp` with `kernel (kh, kw, C)`, no padding added: a sum of shifted
  products, `y[n, i, j, c] = sum_{a, b} xp[n, s*i + a, s*j + b, c] * kernel[a, b, c]`."""
  kh, kw = kernel.shape[0], kernel.shape[1]
  sh, sw = strides
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  # Split xp into its sh x sw phases (space-to-depth), so that every tap is a unit-stride window of one phase: its
  # transpose is then a plain pad rather than an interior (strided) pad, which XLA:CPU fuses badly.
  n, hp, wp, c = xp.shape
  hq, wq = -(-hp // sh), -(-wp // sw)
  xp = jnp.pad(xp, ((0, 0), (0, hq * sh - hp), (0, wq * sw - wp), (0, 0)))
  phases = xp.reshape(n, hq, sh, wq, sw, c)
  y = None
  for a in range(kh):
    for b in range(kw):
      patch = phases[:, a // sh:a // sh + ho, a % sh, b // sw:b // sw + wo, b % sw, :] * kernel[a, b]
      y = patch if y is None else y + patch
  return y


@jax.custom_jvp
def relu6(x: jnp.ndarray) -> jnp.ndarray:
  """`min(max(x, 0), 6)` whose derivative mask is read from the output, not the input.

  Same values and derivatives as `jax.nn.relu6` (the mask `0 < x < 6` equals `0 < y < 6`). Reading the mask from `y`,
  which the next layer needs anyway, keeps XLA from recomputing the producer (a depthwise conv) inside the backward
  pass: on CPU it fused the 9-tap forward into each of the 9 shifted reads of the transposed conv (81 taps per element,
  most of MobileFaceNet's gradient time).
  """
  return jnp.minimum(jnp.maximum(x, 0), 6)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
  y = relu6(primals[0])
  return y, jnp.where((y > 0) & (y < 6), tangents[0], jnp.zeros_like(tangents[0]))


def torch_conv(features: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
               padding: int | Sequence[int] = 0, groups: int = 1, bias: bool = False,
               name: str | None = None) -> nn.Module:
  """`torch.nn.Conv2d(in, features, kernel, stride, padding, groups=groups, bias=bias)` as a Flax NHWC conv.

  A depthwise conv (`groups == features > 1`, one filter per input channel) becomes `DepthwiseConv`.
  """
  ph, pw = _pair(padding)
  if groups > 1 and groups == features:
    return DepthwiseConv(features, _pair(kernel), _pair(stride), (ph, pw), bias, name=name)
  return nn.Conv(features, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                 feature_group_count=groups, use_bias=bias, name=name)


def torch_batch_norm(eps: float = 1e-5, name: str | None = None) -> nn.BatchNorm:
  """Inference-mode `torch.nn.BatchNorm{1,2}d(eps=eps)` (running statistics in `batch_stats`)."""
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=eps, name=name)


def max_pool_valid(x: jnp.ndarray, window: int, stride: int) -> jnp.ndarray:
  """`torch.nn.MaxPool2d(window, stride)` (no padding, floor mode) on NHWC."""
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


class PReLU(nn.Module):
  """Per-channel PReLU: `y = max(0, x) + a * min(0, x)` with `a` of shape `(C,)` (`torch.nn.PReLU(C)`)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    a = self.param("negative_slope", lambda _, shape: jnp.full(shape, 0.25, jnp.float32), (x.shape[-1],))
    return jnp.where(x >= 0, x, a * x)


def flatten(x: jnp.ndarray) -> jnp.ndarray:
  """NHWC -> `(N, H*W*C)`. A following torch Linear's weight is permuted at conversion to match NCHW order."""
  return x.reshape(x.shape[0], -1)
