"""AttGAN encoder, decoder and discriminator (He et al. 2019), the base networks of ErasableMask.

Layouts follow AttGAN's released PyTorch code (`enc_layers`, `dec_layers`, `fc_adv`, `fc_cls`), so parameter paths map
onto it one-to-one: 4x4 stride-2 convolutions with padding 1, BatchNorm (momentum 0.1, eps 1e-5 in PyTorch terms) in
the generator, InstanceNorm with affine parameters in the discriminator, LeakyReLU(0.2) / ReLU activations, and
transposed convolutions whose kernels are stored in PyTorch's orientation (`transpose_kernel=True`).

The decoder optionally runs a second, *clean* branch in lock-step with the same weights and fuses every layer's
activation as `h_adv <- (1 - gamma) * h_adv + gamma * h_clean` (ErasableMask's clean-domain information injection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erasablemask_jax.models.layers import ConvTranspose4x4

Array = jax.Array
Dtype = Any

# PyTorch BatchNorm2d defaults, expressed in Flax's conventions.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_IN_EPSILON = 1e-5
_PT_PAD = ((1, 1), (1, 1))  # Conv2d(k=4, s=2, p=1)


def lerp(a: Array, b: Array, t: float) -> Array:
  """`(1 - t) * a + t * b`, exact at both ends and when `a == b`.

  The fusions of Eq. 7 and the clean-branch injection must collapse to the exact clean computation at `beta = 1`,
  `gamma = 1` or when both branches are equal; the textbook formula is off by a rounding error in those cases. `t` is a
  static Python float, so the form is chosen at trace time.
  """
  if t == 0.0:
    return a
  if t == 1.0:
    return b
  if t < 0.5:
    return a + t * (b - a)
  return b - (1.0 - t) * (b - a)


def tile_attributes(att: Array, size: int, dtype: Dtype) -> Array:
  """Tiles `(B, A)` attribute codes into a `(B, size, size, A)` map (AttGAN's `a.view(..).repeat(..)`)."""
  return jnp.broadcast_to(att[:, None, None, :], (att.shape[0], size, size, att.shape[1])).astype(dtype)


class Encoder(nn.Module):
  """AttGAN encoder: `num_layers` x [Conv 4x4/2 -> BatchNorm -> LeakyReLU(0.2)]; returns every layer's features.

  Used as `G_enc` and, with the same structure, as the perturbation encoder `E_adv`.
  """

  dim: int = 64
  num_layers: int = 5
  max_dim: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> list[Array]:
    features = []
    h = x.astype(self.dtype)
    for i in range(self.num_layers):
      block = f"enc_layers_{i}"
      h = nn.Conv(min(self.dim * 2**i, self.max_dim), (4, 4), strides=(2, 2), padding=_PT_PAD, use_bias=False,
                  dtype=self.dtype, name=f"{block}_conv")(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=self.dtype,
                       name=f"{block}_bn")(h)
      h = nn.leaky_relu(h, 0.2)
      features.append(h)
    return features


class Decoder(nn.Module):
  """AttGAN decoder with attribute tiling, shortcut and injection layers, and optional clean-branch fusion.

  `zs` are the encoder features `ft_1..ft_n` (or the fused `fs_1..fs_n` of Eq. 7); the attribute code is tiled onto the
  bottleneck. After decoder layer `i < shortcut_layers` the encoder feature of the same scale is concatenated; after
  layer `i < inject_layers` the tiled attributes are concatenated again.
  """

  dim: int = 64
  num_layers: int = 5
  max_dim: int = 1024
  shortcut_layers: int = 1
  inject_layers: int = 1
  dtype: Dtype = jnp.float32

  def setup(self):
    convs, norms = [], []
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      features = 3 if last else min(self.dim * 2**(self.num_layers - i - 1), self.max_dim)
      convs.append(ConvTranspose4x4(features, use_bias=last, dtype=self.dtype, name=f"dec_layers_{i}_conv"))
      if not last:
        norms.append(nn.BatchNorm(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=self.dtype,
                                  name=f"dec_layers_{i}_bn"))
    self.convs, self.norms = convs, norms

  def _layer(self, i: int, h: Array, train: bool) -> Array:
    h = self.convs[i](h)
    if i == self.num_layers - 1:
      return jnp.tanh(h)
    return nn.relu(self.norms[i](h, use_running_average=not train))

  def _concat(self, i: int, h: Array, zs: Sequence[Array], att: Array) -> Array:
    if i < self.shortcut_layers:
      h = jnp.concatenate([h, zs[self.num_layers - 2 - i].astype(h.dtype)], axis=-1)
    if i < self.inject_layers:
      h = jnp.concatenate([h, tile_attributes(att, h.shape[1], h.dtype)], axis=-1)
    return h

  def __call__(self, zs: Sequence[Array], att: Array, *, train: bool, clean_zs: Sequence[Array] | None = None,
               gamma: float = 0.0) -> Array | tuple[Array, Array]:
    """Decodes `zs` with attribute codes `att` (already scaled to `(2a - 1) * thres_int`).

    Args:
      zs: encoder features, shallowest first.
      att: `(B, A)` attribute codes.
      train: BatchNorm uses batch statistics (and updates running ones) when True.
      clean_zs: if given, a clean branch decodes `(clean_zs, att)` with the same weights and, after every layer,
        the adversarial activation becomes `(1 - gamma) * h_adv + gamma * h_clean`.
      gamma: clean-domain injection weight.

    Returns:
      The image in [-1, 1]; with `clean_zs`, `(x_adv, x_clean)`, where `x_clean = G_dec(clean_zs, att)`.
    """
    def start(z):
      bottleneck = z[-1].astype(self.dtype)
      return jnp.concatenate([bottleneck, tile_attributes(att, bottleneck.shape[1], self.dtype)], axis=-1)

    h = start(zs)
    if clean_zs is None:
      for i in range(self.num_layers):
        h = self._layer(i, h, train)
        if i < self.num_layers - 1:
          h = self._concat(i, h, zs, att)
      return h
    c = start(clean_zs)
    for i in range(self.num_layers):
      c = self._layer(i, c, train)
      h = lerp(self._layer(i, h, train), c, gamma)
      if i < self.num_layers - 1:
        h, c = self._concat(i, h, zs, att), self._concat(i, c, clean_zs, att)
    return h, c


class AttGAN(nn.Module):
  """Encoder-decoder generator `G = (G_enc, G_dec)`; the restorer `R` has the same structure."""

  enc_dim: int = 64
  enc_layers: int = 5
  dec_dim: int = 64
  dec_layers: int = 5
  max_dim: int = 1024
  shortcut_layers: int = 1
  inject_layers: int = 1
  dtype: Dtype = jnp.float32

  def setup(self):
    self.enc = Encoder(self.enc_dim, self.enc_layers, self.max_dim, self.dtype)
    self.dec = Decoder(self.dec_dim, self.dec_layers, self.max_dim, self.shortcut_layers, self.inject_layers,
                       self.dtype)

  def encode(self, x: Array, *, train: bool) -> list[Array]:
    return self.enc(x, train=train)

  def decode(self, zs: Sequence[Array], att: Array, *, train: bool, clean_zs: Sequence[Array] | None = None,
             gamma: float = 0.0):
    return self.dec(zs, att, train=train, clean_zs=clean_zs, gamma=gamma)

  def __call__(self, x: Array, att: Array, *, train: bool) -> Array:
    return self.decode(self.encode(x, train=train), att, train=train)


class Discriminator(nn.Module):
  """AttGAN discriminator: a conv trunk with two heads, `D_G` (real/fake logit) and `D_att` (attribute logits)."""

  dim: int = 64
  num_layers: int = 5
  fc_dim: int = 1024
  max_dim: int = 1024
  num_attributes: int = 13
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = x.astype(self.dtype)
    for i in range(self.num_layers):
      # No bias: InstanceNorm removes any per-channel constant, so a bias would get an exactly-zero gradient that
      # Adam turns into +-lr steps on rounding noise (AttGAN's PyTorch block carries one; it changes nothing).
      h = nn.Conv(min(self.dim * 2**i, self.max_dim), (4, 4), strides=(2, 2), padding=_PT_PAD, use_bias=False,
                  dtype=self.dtype, name=f"conv_{i}")(h)
      h = nn.InstanceNorm(epsilon=_IN_EPSILON, dtype=self.dtype, name=f"conv_{i}_norm")(h)
      h = nn.leaky_relu(h, 0.2)
    # PyTorch flattens NCHW; transposing here keeps the FC weights in PyTorch's order.
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)

    def head(out: int, name: str) -> Array:
      y = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, name=f"{name}_0")(h))
      return nn.Dense(out, dtype=self.dtype, name=f"{name}_1")(y).astype(jnp.float32)

    return head(1, "fc_adv")[:, 0], head(self.num_attributes, "fc_cls")
