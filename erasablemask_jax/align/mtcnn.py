"""MTCNN's three networks (Zhang et al. 2016) as Flax linen modules.

Layer names and shapes follow facenet-pytorch (`models/mtcnn.py`, MIT), so its `pnet.pt`, `rnet.pt` and `onet.pt`
state dicts convert with a plain rename table (`erasablemask_jax.align.weights`). Inputs are float32 NHWC RGB already
normalised as `(x - 127.5) * 0.0078125` (so in [-1, 1)); outputs are `(bbox_regression, [landmarks,] face_probability)`
where `face_probability` is the softmax probability of the "face" class.

Every conv is VALID (unpadded) and every max-pool uses PyTorch's `ceil_mode=True`: a window that runs past the bottom
or right edge is clipped, which we implement as padding with -inf before a VALID pool.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _max_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Max-pool with PyTorch `ceil_mode=True` semantics on NHWC `x`.

  Output size per spatial dim is `ceil((n - window) / stride) + 1` (PyTorch also drops a last window that would start
  beyond the input, which cannot happen for the shapes used here); out-of-range taps count as -inf.
  """
  pads = []
  for n in x.shape[1:3]:
    out = math.ceil((n - window) / stride) + 1
    if (out - 1) * stride >= n:  # PyTorch rule: the last window must start inside the input.
      out -= 1
    pads.append((0, max(0, (out - 1) * stride + window - n)))
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


class PReLU(nn.Module):
  """Per-channel PReLU, `y = max(x, 0) + a * min(x, 0)`; `a` is the torch `prelu.weight`."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.param("weight", nn.initializers.constant(0.25), (self.features,))
    return jnp.where(x >= 0, x, a * x)


class PNet(nn.Module):
  """Proposal network: fully convolutional, a 12x12 window per output cell (stride 2).

  Args (call):
    x: float32 (B, H, W, 3) normalised images, H, W >= 12.
    valid: optional bool (B, H - 2, W - 2) mask of conv1 outputs that belong to a real image. Used when several
      pyramid levels are packed into one zero-padded canvas: conv1 activations outside every level are set to -inf
      before pool1, which makes the ceil-mode pool (and therefore every output cell whose 12x12 window lies inside a
      level) identical to running P-Net on that level alone.

  Returns:
    `(reg, prob)`: float32 (B, H', W', 4) box offsets and (B, H', W') face probability, with
    H' = ceil((H - 2) / 2) - 4.
  """

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None):
    x = nn.Conv(10, (3, 3), padding="VALID", name="conv1")(x)
    x = PReLU(10, name="prelu1")(x)
    if valid is not None:
      x = jnp.where(valid[..., None], x, -jnp.inf)
    x = _max_pool_ceil(x, 2, 2)
    x = PReLU(16, name="prelu2")(nn.Conv(16, (3, 3), padding="VALID", name="conv2")(x))
    x = PReLU(32, name="prelu3")(nn.Conv(32, (3, 3), padding="VALID", name="conv3")(x))
    logits = nn.Conv(2, (1, 1), name="conv4_1")(x)
    reg = nn.Conv(4, (1, 1), name="conv4_2")(x)
    return reg, jax.nn.softmax(logits, axis=-1)[..., 1]


def _flatten_like_torch(x: jax.Array) -> jax.Array:
  """Flatten NHWC as facenet-pytorch does: `x.permute(0, 3, 2, 1).view(B, -1)` on NCHW, i.e. (W, H, C) order."""
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class RNet(nn.Module):
  """Refinement network on 24x24 crops. Returns `(reg (B, 4), prob (B,))`."""

  @nn.compact
  def __call__(self, x: jax.Array):
    x = PReLU(28, name="prelu1")(nn.Conv(28, (3, 3), padding="VALID", name="conv1")(x))
    x = _max_pool_ceil(x, 3, 2)
    x = PReLU(48, name="prelu2")(nn.Conv(48, (3, 3), padding="VALID", name="conv2")(x))
    x = _max_pool_ceil(x, 3, 2)
    x = PReLU(64, name="prelu3")(nn.Conv(64, (2, 2), padding="VALID", name="conv3")(x))
    x = PReLU(128, name="prelu4")(nn.Dense(128, name="dense4")(_flatten_like_torch(x)))
    logits = nn.Dense(2, name="dense5_1")(x)
    reg = nn.Dense(4, name="dense5_2")(x)
    return reg, jax.nn.softmax(logits, axis=-1)[:, 1]


class ONet(nn.Module):
  """Output network on 48x48 crops. Returns `(reg (B, 4), landmarks (B, 10), prob (B,))`.

  `landmarks` are relative to the crop box: five x coordinates, then five y coordinates, each in units of the box size
  (left eye, right eye, nose, left mouth corner, right mouth corner, from the viewer's left).
  """

  @nn.compact
  def __call__(self, x: jax.Array):
    x = PReLU(32, name="prelu1")(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
    x = _max_pool_ceil(x, 3, 2)
    x = PReLU(64, name="prelu2")(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
    x = _max_pool_ceil(x, 3, 2)
    x = PReLU(64, name="prelu3")(nn.Conv(64, (3, 3), padding="VALID", name="conv3")(x))
    x = _max_pool_ceil(x, 2, 2)
    x = PReLU(128, name="prelu4")(nn.Conv(128, (2, 2), padding="VALID", name="conv4")(x))
    x = PReLU(256, name="prelu5")(nn.Dense(256, name="dense5")(_flatten_like_torch(x)))
    logits = nn.Dense(2, name="dense6_1")(x)
    reg = nn.Dense(4, name="dense6_2")(x)
    landmarks = nn.Dense(10, name="dense6_3")(x)
    return reg, landmarks, jax.nn.softmax(logits, axis=-1)[:, 1]


# Input shapes used to build abstract variables (`jax.eval_shape(module.init, ...)`) for conversion and loading.
INPUT_SHAPES = {"pnet": (1, 12, 12, 3), "rnet": (1, 24, 24, 3), "onet": (1, 48, 48, 3)}
MODULES = {"pnet": PNet, "rnet": RNet, "onet": ONet}
