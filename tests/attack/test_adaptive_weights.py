"""Eq. 11 adaptive weights against values worked out by hand."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax import attack


@jax.jit
def _run_epoch(state, losses):
  for l_pri in losses:
    state = attack.accumulate(state, l_pri)
  return attack.end_epoch(state)


def test_initial_weights_are_exp_of_uniform_softmax():
  state = attack.init_adaptive_weights(3)
  # Both history slots are 1, rate = 1/1, softmax = 1/3 each, w = exp(1/3) = 1.39561242508609.
  np.testing.assert_allclose(state.w, [1.39561242508609] * 3, rtol=1e-6)
  np.testing.assert_array_equal(state.loss_prev, [1, 1, 1])
  np.testing.assert_array_equal(state.loss_prev2, [1, 1, 1])
  assert int(state.count) == 0


def test_two_epochs_against_hand_computed_values():
  state = attack.init_adaptive_weights(3)

  # Epoch 1: mean of [0.8, 0.5, 0.9] and [0.6, 0.5, 0.7] is [0.7, 0.5, 0.8]; rate = [0.7, 0.5, 0.8] / 1.
  # exp(rate) = [2.013753, 1.648721, 2.225541], sum 5.888015, softmax = [0.342009, 0.280013, 0.377978],
  # w = exp(softmax) = [1.407773, 1.323147, 1.459331].
  state = _run_epoch(state, jnp.array([[0.8, 0.5, 0.9], [0.6, 0.5, 0.7]]))
  np.testing.assert_allclose(state.loss_prev, [0.7, 0.5, 0.8], rtol=1e-6)
  np.testing.assert_allclose(state.loss_prev2, [1, 1, 1], rtol=0)
  np.testing.assert_allclose(state.w, [1.407773, 1.323147, 1.459331], rtol=2e-6)
  assert int(state.count) == 0 and np.all(np.asarray(state.loss_sum) == 0)

  # Epoch 2: one step [0.35, 0.5, 0.4]; rate = [0.35/0.7, 0.5/0.5, 0.4/0.8] = [0.5, 1.0, 0.5].
  # softmax = [e^.5, e, e^.5] / (2 e^.5 + e) = [0.274069, 0.451862, 0.274069], w = [1.315305, 1.571236, 1.315305].
  state = _run_epoch(state, jnp.array([[0.35, 0.5, 0.4]]))
  np.testing.assert_allclose(state.loss_prev, [0.35, 0.5, 0.4], rtol=1e-6)
  np.testing.assert_allclose(state.loss_prev2, [0.7, 0.5, 0.8], rtol=1e-6)
  np.testing.assert_allclose(state.w, [1.315305, 1.571236, 1.315305], rtol=2e-6)


def test_a_surrogate_whose_loss_falls_slowly_gets_more_weight():
  state = _run_epoch(attack.init_adaptive_weights(2), jnp.array([[0.9, 0.3]]))
  assert state.w[0] > state.w[1]


def test_an_epoch_without_steps_changes_nothing():
  state = _run_epoch(attack.init_adaptive_weights(3), jnp.array([[0.8, 0.5, 0.9]]))
  again = jax.jit(attack.end_epoch)(state)
  chex.assert_trees_all_close(again, state)


def test_state_is_a_pytree_of_arrays():
  state = attack.accumulate(attack.init_adaptive_weights(3), jnp.array([0.5, 0.6, 0.7]))
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 5 and all(isinstance(a, jax.Array) for a in leaves)
  restored = jax.tree.unflatten(treedef, [np.asarray(a) for a in leaves])  # as from a checkpoint
  chex.assert_trees_all_close(attack.end_epoch(restored), attack.end_epoch(state))


def test_invalid_size():
  with pytest.raises(ValueError, match="num_surrogates"):
    attack.init_adaptive_weights(0)
