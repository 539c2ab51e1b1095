"""Tiny generators and surrogate FR nets for the attack tests.

Everything is smooth (tanh, softplus, sin) so central finite differences are accurate, and the surrogates are three
different architectures, as in the real zoo. `make_problem` is a fixture returning a builder so a test can create the
arrays inside its own `jax.enable_x64` context.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@dataclasses.dataclass(frozen=True)
class Problem:
  theta: Any
  generate: Callable[[Any], jax.Array]
  fr_losses: Sequence[Callable[[jax.Array], jax.Array]]
  w: jax.Array


def _conv(x, kernel, stride=1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _normalise(e):
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _fr_loss(embed, x_target):
  """1 - mean cos(FR(x_target), FR(x)), Eq. 9 (the target embedding is folded into the compiled program)."""
  return lambda x: 1.0 - jnp.mean(jnp.sum(_normalise(embed(x_target)) * _normalise(embed(x)), axis=-1))


def _surrogates(rng, x_target, dtype):
  """Three tiny FR nets of different architectures, 8-d embeddings."""
  c = x_target.shape[-1]
  n = lambda shape, s: jnp.asarray(s * rng.standard_normal(shape), dtype)
  conv_k, conv_d = n((3, 3, c, 6), 0.4), n((6, 8), 0.5)
  mlp_1, mlp_2 = n((x_target[0].size, 16), 0.2), n((16, 8), 0.4)
  sin_k, sin_d = n((2, 2, c, 4), 0.5), n(((x_target.shape[1] // 2) ** 2 * 4, 8), 0.2)

  def conv_net(x):  # conv stride 2 -> tanh -> global mean -> dense
    return jnp.mean(jnp.tanh(_conv(x, conv_k, 2)), axis=(1, 2)) @ conv_d

  def mlp(x):  # flatten -> dense -> softplus -> dense
    return jax.nn.softplus(x.reshape(x.shape[0], -1) @ mlp_1) @ mlp_2

  def sin_net(x):  # a fixed "noise" offset, conv 2x2 stride 2 -> sin -> flatten -> dense
    h = jnp.sin(_conv(x + 0.05, sin_k, 2))
    return h.reshape(h.shape[0], -1) @ sin_d

  return tuple(_fr_loss(f, x_target) for f in (conv_net, mlp, sin_net))


def _plain_problem(seed, dtype, num_surrogates):
  """A BatchNorm-free generator on a dict of arrays: x_adv = tanh(x + 0.5 conv_1x1(tanh(conv_3x3(x) + b)))."""
  rng = np.random.default_rng(seed)
  x_cov = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), dtype)
  x_target = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), dtype)
  theta = {
      "conv": jnp.asarray(0.3 * rng.standard_normal((3, 3, 3, 4)), dtype),
      "bias": jnp.asarray(0.1 * rng.standard_normal((4,)), dtype),
      "out": jnp.asarray(0.5 * rng.standard_normal((1, 1, 4, 3)), dtype),
  }

  def generate(t):
    h = jnp.tanh(_conv(x_cov, t["conv"]) + t["bias"])
    return jnp.tanh(x_cov + 0.5 * _conv(h, t["out"]))

  fr_losses = _surrogates(rng, x_target, dtype)[:num_surrogates]
  w = jnp.asarray([1.3, 1.1, 1.6][:num_surrogates], dtype)
  return Problem(theta, generate, fr_losses, w)


class _Encoder(nn.Module):
  """Two conv layers with a train-mode BatchNorm, like one stage of E_adv."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, dtype=self.dtype, param_dtype=self.dtype, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=False, dtype=self.dtype, param_dtype=self.dtype, name="bn1")(x)
    x = jnp.tanh(x)
    return nn.Conv(6, (3, 3), dtype=self.dtype, param_dtype=self.dtype, name="conv2")(x)


class _Decoder(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, z):
    x = nn.ConvTranspose(3, (4, 4), strides=(2, 2), dtype=self.dtype, param_dtype=self.dtype, name="deconv")(z)
    return jnp.tanh(x)


def _random_variables(module, rng, dtype, *args):
  """Variables shaped by `jax.eval_shape(module.init)`, filled with numpy randoms (no compiled init)."""

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return jnp.asarray(np.zeros(leaf.shape) if "mean" in name else np.ones(leaf.shape), dtype)
    base = 1.0 if "scale" in name else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(leaf.shape), dtype)

  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _flax_problem(seed, dtype):
  """x_adv = G_dec(beta G_enc(x) + (1 - beta) E_adv(x)) with linen modules; theta = E_adv's 'params' collection."""
  rng = np.random.default_rng(seed)
  x_cov = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), dtype)
  x_target = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), dtype)
  enc, dec = _Encoder(dtype), _Decoder(dtype)
  enc_vars = _random_variables(enc, rng, dtype, x_cov)
  dec_vars = _random_variables(dec, rng, dtype, jax.ShapeDtypeStruct((2, 4, 4, 6), dtype))
  e_adv_params = _random_variables(enc, rng, dtype, x_cov)["params"]

  def generate(params):
    z_clean, _ = enc.apply(enc_vars, x_cov, mutable=["batch_stats"])
    perb, _ = enc.apply({"params": params, "batch_stats": enc_vars["batch_stats"]}, x_cov, mutable=["batch_stats"])
    return dec.apply(dec_vars, 0.5 * z_clean + 0.5 * perb)

  return Problem(e_adv_params, generate, _surrogates(rng, x_target, dtype), jnp.asarray([1.3, 1.1, 1.6], dtype))


_CACHE = {}


@pytest.fixture(scope="session")
def make_problem():
  """make_problem(kind="plain"|"flax", dtype=..., num_surrogates=3) -> Problem, the same object for the same key.

  Reusing the objects lets jitted functions that take the callables as static arguments hit their compile cache
  across tests. A float64 problem must be built and used inside `jax.enable_x64(True)`.
  """

  def build(kind="plain", dtype=jnp.float32, num_surrogates=3):
    key = (kind, jnp.dtype(dtype).name, num_surrogates)
    if key not in _CACHE:
      _CACHE[key] = _plain_problem(0, dtype, num_surrogates) if kind == "plain" else _flax_problem(0, dtype)
    return _CACHE[key]

  return build
