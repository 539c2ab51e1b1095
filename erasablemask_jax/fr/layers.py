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
import jax.numpy as jnp


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def torch_conv(features: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
               padding: int | Sequence[int] = 0, groups: int = 1, bias: bool = False,
               name: str | None = None) -> nn.Conv:
  """`torch.nn.Conv2d(in, features, kernel, stride, padding, groups=groups, bias=bias)` as a Flax NHWC conv."""
  ph, pw = _pair(padding)
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
