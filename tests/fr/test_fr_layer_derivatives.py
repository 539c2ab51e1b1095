"""The zoo's fast layer forms have the same values and derivatives (to all orders the attack uses) as the plain ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from erasablemask_jax.fr import layers


def _grouped_conv(x, kernel, stride, pad):
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@pytest.mark.parametrize("stride,size,kernel_size,pad", [(1, 8, 3, 1), (2, 8, 3, 1), (2, 9, 3, 1), (2, 7, 3, 0),
                                                         (1, 7, 7, 0)])
def test_depthwise_conv_matches_grouped_conv_to_second_order(stride, size, kernel_size, pad):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, size, size, 5), jnp.float32)
  kernel = jnp.asarray(rng.randn(kernel_size, kernel_size, 1, 5), jnp.float32)
  module = layers.DepthwiseConv(5, (kernel_size, kernel_size), (stride, stride), (pad, pad))

  def ours(x, k):
    return jnp.sum(jnp.tanh(module.apply({"params": {"kernel": k}}, x)) ** 2)

  def plain(x, k):
    return jnp.sum(jnp.tanh(_grouped_conv(x, k, stride, pad)) ** 2)

  np.testing.assert_allclose(ours(x, kernel), plain(x, kernel), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(plain, (0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  hvp = lambda f: jax.jvp(jax.grad(f), (x, kernel), (x, kernel))[1]  # forward-over-reverse, as the attack
  np.testing.assert_allclose(hvp(ours), hvp(plain), rtol=1e-4, atol=1e-3)


def test_relu6_has_jax_relu6_values_and_derivatives():
  x = jnp.array([-1.0, 0.0, 0.5, 3.0, 6.0, 7.5, jnp.nan])
  np.testing.assert_array_equal(layers.relu6(x), jax.nn.relu6(x))
  ones = jnp.ones_like(x)
  np.testing.assert_array_equal(jax.jvp(layers.relu6, (x,), (ones,))[1], jax.jvp(jax.nn.relu6, (x,), (ones,))[1])
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(layers.relu6(v) * jnp.arange(7.0)))(x),
                                jax.grad(lambda v: jnp.sum(jax.nn.relu6(v) * jnp.arange(7.0)))(x))
