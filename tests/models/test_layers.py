"""`ConvTranspose4x4` equals Flax's `nn.ConvTranspose` (PyTorch `ConvTranspose2d(k=4, s=2, p=1)`) in value and in
every derivative the trainer takes: gradients, forward-over-reverse HVPs and reverse-over-reverse."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax.models.layers import ConvTranspose4x4, conv_transpose_4x4_s2


def _flax(features, use_bias):
  return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True,
                          use_bias=use_bias)


def _close(a, b, tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol * max(1.0, float(jnp.abs(v).max()))),
               a, b)


@pytest.mark.parametrize("shape,use_bias", [((2, 4, 4, 3), True), ((1, 5, 7, 6), False)])
def test_same_parameters_values_and_derivatives_as_flax(shape, use_bias):
  x = jax.random.normal(jax.random.key(1), shape)
  ours, ref = ConvTranspose4x4(5, use_bias=use_bias), _flax(5, use_bias)
  variables = ref.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(0), x), variables)  # same names, shapes, init
  if use_bias:
    variables = {"params": {**variables["params"], "bias": jax.random.normal(jax.random.key(2), (5,))}}
  np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))
  assert ours.apply(variables, x).shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)

  loss = lambda m: (lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))))
  grad = lambda m: jax.grad(loss(m), argnums=(0, 1))(variables, x)
  _close(grad(ours), grad(ref), 1e-5)
  hvp = lambda m: jax.jvp(jax.grad(loss(m), argnums=(0, 1)), (variables, x), (variables, x))[1]
  _close(hvp(ours), hvp(ref), 1e-5)
  rev_rev = lambda m: jax.grad(lambda v: jnp.sum(jax.grad(loss(m), argnums=1)(v, x) ** 2))(variables)
  _close(rev_rev(ours), rev_rev(ref), 1e-5)


def test_kernel_gradient_program_has_no_dilated_input():
  """The point of the layer: the kernel gradient is stride-1 convolutions, not one of the 2x-dilated input."""
  x, kernel = jnp.ones((2, 8, 8, 16)), jnp.ones((4, 4, 8, 16))

  def dilated_convs(fn):
    hlo = jax.jit(jax.grad(lambda k: jnp.sum(fn(x, k) ** 2))).lower(kernel).as_text()
    return sum("stablehlo.convolution" in line and "lhs_dilate = [2, 2]" in line for line in hlo.splitlines())

  flax_form = lambda x, k: _flax(8, False).apply({"params": {"kernel": k}}, x)
  assert dilated_convs(flax_form) == 2  # the value and the kernel gradient
  assert dilated_convs(conv_transpose_4x4_s2) == 1  # the value only
