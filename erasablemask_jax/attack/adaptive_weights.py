"""The self-adaptive surrogate weights of Eq. 11, as an immutable pytree carried in the train state.

Once per epoch t (Algorithm 1, line 15):

  rate_i(t) = Mean(L_FR_i{t-1}) / Mean(L_FR_i{t-2}),      i = 1..K
  w_i(t)    = exp( softmax(rate(t))_i ),

where Mean(L_FR_i{t}) is surrogate i's primary loss (Eq. 9) averaged over the steps of epoch t, and both history
slots start at 1 (Algorithm 1, line 1), so the first epoch uses w_i = exp(1/K) for every i.

The state holds the two history slots, the weights in force, and the running sum and count of the current epoch's
primary losses, so a run resumed mid-epoch from a checkpoint continues the same epoch mean.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class AdaptiveWeights:
  """Eq. 11 state; every field is an array, so it checkpoints and shards as a plain pytree.

  Attributes:
    w: (K,) the weights w_i(t) used by the auxiliary losses of the current epoch.
    loss_prev: (K,) Mean(L_FR_i{t-1}), the mean primary loss of the last finished epoch (1 before any).
    loss_prev2: (K,) Mean(L_FR_i{t-2}), the one before it (1 before any).
    loss_sum: (K,) the sum of the primary losses accumulated in the current epoch.
    count: () int32, how many steps `loss_sum` holds.
  """

  w: jax.Array
  loss_prev: jax.Array
  loss_prev2: jax.Array
  loss_sum: jax.Array
  count: jax.Array


def weights_from_history(loss_prev: jax.Array, loss_prev2: jax.Array) -> jax.Array:
  """w_i = exp(softmax(loss_prev / loss_prev2)_i), Eq. 11.

  Args:
    loss_prev: (K,) mean primary loss of epoch t-1.
    loss_prev2: (K,) mean primary loss of epoch t-2.

  Returns:
    (K,) weights, each in (1, e).
  """
  rate = loss_prev / loss_prev2
  return jnp.exp(jax.nn.softmax(rate))


def init_adaptive_weights(num_surrogates: int, dtype=jnp.float32) -> AdaptiveWeights:
  """The state before the first epoch: both history slots 1, hence w_i = exp(1/K).

  Args:
    num_surrogates: K, the number of white-box surrogate FR models.
    dtype: float dtype of the weights and the loss history.

  Returns:
    An `AdaptiveWeights` with an empty epoch accumulator.
  """
  if num_surrogates < 1:
    raise ValueError(f"num_surrogates must be >= 1, got {num_surrogates}")
  ones = jnp.ones((num_surrogates,), dtype)
  return AdaptiveWeights(
      w=weights_from_history(ones, ones),
      loss_prev=ones,
      loss_prev2=ones,
      loss_sum=jnp.zeros((num_surrogates,), dtype),
      count=jnp.zeros((), jnp.int32),
  )


def accumulate(state: AdaptiveWeights, l_pri: jax.Array) -> AdaptiveWeights:
  """Adds one step's primary losses L_pri_i (Eq. 9, each a batch mean) to the current epoch's sum.

  Args:
    state: the current state.
    l_pri: (K,) the step's primary losses, e.g. `aux["l_pri"]` of the attack.

  Returns:
    The state with `loss_sum += l_pri` and `count += 1`; weights unchanged.
  """
  l_pri = jax.lax.stop_gradient(jnp.asarray(l_pri, state.loss_sum.dtype))
  return state.replace(loss_sum=state.loss_sum + l_pri, count=state.count + 1)


def end_epoch(state: AdaptiveWeights) -> AdaptiveWeights:
  """Closes epoch t-1 and computes w(t): shifts the history and applies Eq. 11.

  loss_prev2 <- loss_prev; loss_prev <- loss_sum / count; w <- exp(softmax(loss_prev / loss_prev2)); the accumulator
  is emptied. An epoch with no accumulated step (count == 0) leaves history and weights as they were.

  Args:
    state: the state at the end of an epoch.

  Returns:
    The state for the next epoch.
  """
  has_steps = state.count > 0
  mean = state.loss_sum / jnp.maximum(state.count, 1).astype(state.loss_sum.dtype)
  loss_prev = jnp.where(has_steps, mean, state.loss_prev)
  loss_prev2 = jnp.where(has_steps, state.loss_prev, state.loss_prev2)
  return AdaptiveWeights(
      w=jnp.where(has_steps, weights_from_history(loss_prev, loss_prev2), state.w),
      loss_prev=loss_prev,
      loss_prev2=loss_prev2,
      loss_sum=jnp.zeros_like(state.loss_sum),
      count=jnp.zeros_like(state.count),
  )
