"""Each loss of Eq. 3, 4, 5, 8 and 13 against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax import losses


def _log_sigmoid(z):
  return -math.log1p(math.exp(-z))


def test_eq3_discriminator_and_generator():
  real, fake = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0])
  expected_d = np.mean([-_log_sigmoid(2.0) - _log_sigmoid(-0.5), -_log_sigmoid(-1.0) - _log_sigmoid(3.0)])
  expected_g = np.mean([-_log_sigmoid(0.5), -_log_sigmoid(-3.0)])
  np.testing.assert_allclose(losses.discriminator_adversarial_loss(real, fake), expected_d, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake), expected_g, rtol=1e-6)


def test_eq4_attribute_bce_is_mean_over_attributes_and_batch():
  logits = jnp.array([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])
  labels = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
  terms = [
      -_log_sigmoid(1.0), -_log_sigmoid(2.0), -_log_sigmoid(0.0),
      -_log_sigmoid(-3.0), -_log_sigmoid(0.5), -_log_sigmoid(-1.0),
  ]
  np.testing.assert_allclose(losses.attribute_loss(logits, labels), sum(terms) / 6, rtol=1e-6)


def test_eq4_attribute_bce_does_not_grow_with_the_number_of_attributes():
  # AttGAN's convention: 13 copies of one attribute's logits and labels give that attribute's loss, not 13 times it.
  logits = jnp.array([[0.7], [-1.5]])
  labels = jnp.array([[1.0], [1.0]])
  one = losses.attribute_loss(logits, labels)
  np.testing.assert_allclose(losses.attribute_loss(jnp.tile(logits, (1, 13)), jnp.tile(labels, (1, 13))), one,
                             rtol=1e-6)


def test_eq5_reconstruction_is_mean_absolute_error():
  x = jnp.zeros((2, 2, 2, 3))
  y = x.at[0, 0, 0, 0].set(0.6).at[1, 1, 1, 2].set(-1.2)
  np.testing.assert_allclose(losses.reconstruction_loss(y, x), 1.8 / 24, rtol=1e-6)


@pytest.mark.parametrize("scale, expected_norm", [(1.0, 5.0), (10.0, 50.0)])
def test_eq8_hinge_below_and_above_sigma1(scale, expected_norm):
  x_edit = jnp.zeros((1, 2, 2, 3))
  x_adv = x_edit.at[0, 0, 0, 0].set(3.0 * scale).at[0, 1, 1, 1].set(4.0 * scale)  # ||.||_2 = 5 * scale
  sigma1 = 30.0
  value, grad = jax.value_and_grad(losses.perturbation_loss)(x_adv, x_edit, sigma1)
  np.testing.assert_allclose(value, max(sigma1, expected_norm), rtol=1e-6)
  if expected_norm < sigma1:
    assert float(jnp.abs(grad).sum()) == 0.0  # flat below the hinge
  else:
    np.testing.assert_allclose(grad[0, 0, 0, 0], 3.0 * scale / expected_norm, rtol=1e-6)


def test_eq8_batch_mean_of_per_image_hinge():
  x_edit = jnp.zeros((2, 1, 1, 3))
  x_adv = x_edit.at[0, 0, 0, 0].set(40.0).at[1, 0, 0, 0].set(1.0)
  np.testing.assert_allclose(losses.perturbation_loss(x_adv, x_edit, 30.0), (40.0 + 30.0) / 2, rtol=1e-6)


def test_eq13_erasure_is_per_image_l2_then_batch_mean():
  x = jnp.zeros((2, 1, 2, 2))
  x_rec = x.at[0].set(1.0).at[1, 0, 0, 0].set(2.0)  # norms 2 and 2
  x_rec = x_rec.at[1, 0, 1, 1].set(-1.0)  # second image: sqrt(5)
  np.testing.assert_allclose(losses.erasure_loss(x_rec, x), (2.0 + math.sqrt(5.0)) / 2, rtol=1e-6)


def test_l2_losses_have_finite_gradient_at_zero():
  x = jnp.ones((1, 2, 2, 3))
  grad = jax.grad(losses.erasure_loss)(x, x)
  assert bool(jnp.all(jnp.isfinite(grad)))
