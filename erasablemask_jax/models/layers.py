"""AttGAN's upsampling layer, PyTorch `ConvTranspose2d(k=4, s=2, p=1)`, with a fast kernel gradient on every backend.

`nn.ConvTranspose` lowers to a convolution of the 2x-dilated input. Its value and its input gradient are fast, but its
kernel gradient is a convolution with a dilated window, which XLA:CPU runs at a few GFLOP/s: in a stage-2 step at
128x128 the restorer's five decoder kernel gradients took about 0.45 s of a 2 s step.

`conv_transpose_4x4_s2` keeps that lowering for the value and for the input tangent, and computes the kernel tangent in
the sub-pixel form: output pixel `(2m + ry, 2n + rx)` only meets the kernel taps of parity `(ry, rx)`, so each of the
four output phases is a stride-1 2x2 convolution of the 1-padded input with a 2x2 slice of the kernel. The transpose
of that form (the kernel gradient) is four ordinary stride-1 kernel gradients, 10-15x faster on CPU. Both forms are
the same linear map, so every derivative order is exact; the custom JVP only chooses which program XLA sees.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax.linen import dtypes
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = jax.Array

_PAD = ((2, 2), (2, 2))  # ConvTranspose2d(k=4, s=2, p=1) == conv of the 2x-dilated input padded by k - 1 - p
_DIMS = ("NHWC", "HWIO", "NHWC")
# Output parity r along one axis reads the 1-padded input at offsets (0, 1) + r with these kernel taps (PyTorch frame).
_TAPS = {0: (3, 1), 1: (2, 0)}


def _dilated_form(x: Array, kernel: Array) -> Array:
  """The value as Flax's `nn.ConvTranspose(transpose_kernel=True)` computes it (kernel `(4, 4, out, in)`)."""
  return lax.conv_transpose(x, kernel, (2, 2), _PAD, transpose_kernel=True, dimension_numbers=_DIMS)


def _subpixel_form(x: Array, kernel: Array) -> Array:
  """The same map as four stride-1 2x2 convolutions, one per output phase, interleaved.

  With the kernel in PyTorch's frame `W[a, b, in, out] = kernel[a, b, out, in]`, output row `2m + r` is
  `sum_a x[m + d] W[a]` over the two taps `a` of parity `1 - r` (`a = 2(m - i) + r + 1`), i.e. a 2-tap window of the
  1-padded input starting at row `m + r`.
  """
  n, h, w, _ = x.shape
  weight = jnp.swapaxes(kernel, 2, 3)  # (4, 4, in, out)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = []
  for ry in (0, 1):
    cols = []
    for rx in (0, 1):
      taps = jnp.stack([jnp.stack([weight[a, b] for b in _TAPS[rx]]) for a in _TAPS[ry]])  # (2, 2, in, out)
      window = xp[:, ry:ry + h + 1, rx:rx + w + 1]
      cols.append(lax.conv_general_dilated(window, taps, (1, 1), "VALID", dimension_numbers=_DIMS))
    rows.append(jnp.stack(cols, axis=3))  # (n, h, w, rx, out)
  y = jnp.stack(rows, axis=2)  # (n, h, ry, w, rx, out)
  return y.reshape(n, 2 * h, 2 * w, kernel.shape[2])


@jax.custom_jvp
def conv_transpose_4x4_s2(x: Array, kernel: Array) -> Array:
  """PyTorch `ConvTranspose2d(in, out, 4, 2, 1)` on NHWC `x`; `kernel` is `(4, 4, out, in)` (Flax `transpose_kernel`).

  Equal to `nn.ConvTranspose(out, (4, 4), (2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True)`; only the
  program of the kernel derivative differs (see the module docstring).
  """
  return _dilated_form(x, kernel)


def _conv_transpose_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = conv_transpose_4x4_s2(x, kernel)
  dy = jnp.zeros_like(y)
  if not isinstance(dx, SymbolicZero):
    dy = dy + conv_transpose_4x4_s2(dx, kernel)
  if not isinstance(dkernel, SymbolicZero):
    dy = dy + _subpixel_form(x, dkernel)
  return y, dy


conv_transpose_4x4_s2.defjvp(_conv_transpose_jvp, symbolic_zeros=True)


class ConvTranspose4x4(nn.Module):
  """`nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True)`.

  Same parameters (`kernel` `(4, 4, features, in)`, optional `bias`), initialisers and values; its kernel gradient runs
  through `conv_transpose_4x4_s2`'s sub-pixel form.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (4, 4, self.features, x.shape[-1]), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv_transpose_4x4_s2(x, kernel)
    return y if bias is None else y + bias
