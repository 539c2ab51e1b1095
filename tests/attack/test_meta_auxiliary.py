"""The meta-auxiliary attack: exact against finite differences and nested jax.grad, hinge, first order, ensemble."""

from __future__ import annotations

import functools

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax import attack

LR_INNER = 0.5  # large, so the Hessian term is a visible part of the gradient of the tiny problems

# Jitted once per module with the callables static: the session-cached problems make later calls cache hits.
_STATIC = ("generate", "fr_losses", "first_order", "primaries")
_fast_jit = jax.jit(attack.meta_auxiliary_value_and_grad, static_argnames=_STATIC)
_nested_jit = jax.jit(jax.value_and_grad(attack.meta_auxiliary_loss_nested), static_argnames=_STATIC[:3])


def _flat(tree):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def _rel_err(a, b):
  a, b = _flat(a), _flat(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _fast(prob, lr_inner=LR_INNER, epsilon=0.0, first_order=False, primaries="unrolled"):
  # Every argument always passed the same way, so equal settings share one compiled program.
  return _fast_jit(prob.theta, generate=prob.generate, fr_losses=prob.fr_losses, w=prob.w, lr_inner=lr_inner,
                   epsilon=epsilon, first_order=first_order, primaries=primaries)


def _nested(prob, lr_inner=LR_INNER, first_order=False):
  return _nested_jit(prob.theta, generate=prob.generate, fr_losses=prob.fr_losses, w=prob.w, lr_inner=lr_inner,
                     first_order=first_order)


def _central_differences(loss, theta, h):
  """Every coordinate's (L(theta + h e_i) - L(theta - h e_i)) / 2h, all evaluations in one vmapped, jitted call."""
  flat, unravel = jax.flatten_util.ravel_pytree(theta)
  eye = jnp.eye(flat.size, dtype=flat.dtype)
  values = jax.jit(jax.vmap(lambda d: loss(unravel(flat + d))))(jnp.concatenate([h * eye, -h * eye]))
  return unravel((values[:flat.size] - values[flat.size:]) / (2 * h))


def test_meta_gradient_matches_finite_differences_float64(make_problem):
  # The flax problem is checked against the nested reference below, which this test checks against differences.
  with jax.enable_x64(True):
    prob = make_problem("plain", dtype=jnp.float64)
    l_adv, grad, aux = _fast(prob)
    loss = functools.partial(attack.meta_auxiliary_loss_nested, generate=prob.generate, fr_losses=prob.fr_losses,
                             w=prob.w, lr_inner=LR_INNER)
    fd = _central_differences(loss, prob.theta, h=1e-5)
    chex.assert_trees_all_equal_shapes_and_dtypes(grad, prob.theta)
    assert _rel_err(grad, fd) <= 1e-4, _rel_err(grad, fd)
    np.testing.assert_allclose(l_adv, jax.jit(loss)(prob.theta), rtol=1e-12)
    np.testing.assert_allclose(aux["l_total"], (aux["l_pri"].sum() + aux["l_aux"].sum()) / 6, rtol=1e-12)


@pytest.mark.parametrize("kind, first_order", [("plain", False), ("plain", True), ("flax", False)])
def test_every_primaries_strategy_equals_nested_jax_grad(make_problem, kind, first_order):
  with jax.enable_x64(True):
    prob = make_problem(kind, dtype=jnp.float64)
    l_ref, g_ref = _nested(prob, first_order=first_order)
    for primaries in attack.PRIMARIES:
      l_fast, g_fast, _ = _fast(prob, primaries=primaries, first_order=first_order)
      assert _rel_err(g_fast, g_ref) <= 1e-5, primaries
      np.testing.assert_allclose(l_fast, l_ref, rtol=1e-12)


def test_fast_gradient_equals_nested_in_float32(make_problem):
  prob = make_problem("plain", dtype=jnp.float32)
  _, g_fast, aux = _fast(prob)
  _, g_ref = _nested(prob)
  chex.assert_tree_all_finite((g_fast, aux))
  assert _rel_err(g_fast, g_ref) <= 1e-4


def test_aux_losses_by_hand(make_problem):
  with jax.enable_x64(True):
    prob = make_problem("plain", dtype=jnp.float64)
    results = [_fast(prob, primaries=p) for p in attack.PRIMARIES]
    for _, _, aux in results[1:]:
      chex.assert_trees_all_close(aux, results[0][2], rtol=1e-12)

    @jax.jit
    def by_hand(theta):
      # L_aux_p for p = 0: the inner step on surrogate 0, then surrogates 1 and 2 at theta'_0, weighted by w / (K-1).
      x_0 = prob.generate(attack.inner_update(theta, prob.generate, prob.fr_losses[0], LR_INNER))
      l_aux_0 = (prob.w[1] * prob.fr_losses[1](x_0) + prob.w[2] * prob.fr_losses[2](x_0)) / 2
      return l_aux_0, prob.fr_losses[1](prob.generate(theta))

    l_aux_0, l_pri_1 = by_hand(prob.theta)
    np.testing.assert_allclose(results[0][2]["l_aux"][0], l_aux_0, rtol=1e-10)
    np.testing.assert_allclose(results[0][2]["l_pri"][1], l_pri_1, rtol=1e-12)


def test_first_order_differs_from_exact(make_problem):
  with jax.enable_x64(True):
    prob = make_problem("plain", dtype=jnp.float64)
    _, exact, _ = _fast(prob)
    _, first, _ = _fast(prob, first_order=True)
    # The dropped term is lr/(2K) sum_p H_p a_p: clearly non-zero, yet small next to the gradient itself.
    assert 1e-3 < _rel_err(first, exact) < 0.5
    # With lr -> 0 the inner step vanishes and both agree.
    _, exact_0, _ = _fast(prob, lr_inner=0.0)
    _, first_0, _ = _fast(prob, lr_inner=0.0, first_order=True)
    assert _rel_err(first_0, exact_0) < 1e-12


@pytest.mark.parametrize("kind", attack.KINDS)
def test_hinge_of_eq12(make_problem, kind):
  prob = make_problem("plain")
  run = jax.jit(lambda t, w, eps: attack.make_attack(kind, lr_inner=LR_INNER, epsilon=eps)(
      t, prob.generate, prob.fr_losses, w))
  _, g_free, aux = run(prob.theta, prob.w, 0.0)
  total = float(aux["l_total"])

  l_below, g_below, _ = run(prob.theta, prob.w, total + 0.1)  # loss below epsilon: hinge active, no gradient
  np.testing.assert_allclose(l_below, total + 0.1, rtol=1e-6)
  assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(g_below))

  l_above, g_above, _ = run(prob.theta, prob.w, total - 0.1)  # loss above epsilon: the unhinged gradient
  np.testing.assert_allclose(l_above, total, rtol=1e-6)
  chex.assert_trees_all_close(g_above, g_free, rtol=1e-6)
  assert float(jnp.linalg.norm(_flat(g_above))) > 1e-3


def test_ensemble_is_hinged_plain_mean(make_problem):
  with jax.enable_x64(True):
    prob = make_problem("plain", dtype=jnp.float64)

    def mean_loss(t):
      x = prob.generate(t)
      return sum(loss(x) for loss in prob.fr_losses) / 3

    l_adv, grad, aux = jax.jit(lambda t: attack.ensemble_value_and_grad(t, prob.generate, prob.fr_losses))(prob.theta)
    l_ref, g_ref = jax.jit(jax.value_and_grad(mean_loss))(prob.theta)
    np.testing.assert_allclose(l_adv, l_ref, rtol=1e-12)
    chex.assert_trees_all_close(grad, g_ref, rtol=1e-10)
    assert aux["l_pri"].shape == (3,)
    # It is a different objective from the meta-auxiliary one.
    _, meta, _ = _fast(prob)
    assert _rel_err(grad, meta) > 1e-2


def test_attack_loss_custom_vjp_inside_a_jitted_total_loss(make_problem):
  """A trainer's total loss: l_adv * L_adv(theta) + another term, one jax.grad, data passed in as jit arguments."""
  prob = make_problem("plain")
  attack_fn = attack.make_attack("meta_auxiliary", lr_inner=LR_INNER)

  @jax.jit
  def step(theta, w, scale):
    # `scale` is a traced value the generator closes over, as x_cov is in the trainer.
    generate = lambda t: prob.generate(t) * scale
    loss_fn = attack.attack_loss(attack_fn, generate, prob.fr_losses, w)

    def total(t):
      l_adv, aux = loss_fn(t)
      return 200.0 * l_adv + sum(jnp.sum(a ** 2) for a in jax.tree.leaves(t)), aux

    (value, aux), grad = jax.value_and_grad(total, has_aux=True)(theta)
    l_adv, g_adv, _ = attack_fn(theta, generate, prob.fr_losses, w)
    expected = jax.tree.map(lambda g, t: 200.0 * g + 2 * t, g_adv, theta)
    return grad, expected, aux

  grad, expected, aux = step(prob.theta, prob.w, jnp.float32(0.9))
  chex.assert_trees_all_close(grad, expected, rtol=1e-5, atol=1e-7)
  assert aux["l_pri"].shape == (3,)


def test_boundary_errors(make_problem):
  prob = make_problem("plain", num_surrogates=1)
  with pytest.raises(ValueError, match="at least 2 surrogate"):
    attack.meta_auxiliary_value_and_grad(prob.theta, prob.generate, prob.fr_losses, prob.w, lr_inner=0.1)
  with pytest.raises(ValueError, match="attack.kind"):
    attack.make_attack("meta", lr_inner=0.1)
  with pytest.raises(ValueError, match="attack.primaries"):
    attack.make_attack("meta_auxiliary", primaries="pmap")
  prob = make_problem("plain")
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    attack.meta_auxiliary_value_and_grad(prob.theta, prob.generate, prob.fr_losses, prob.w[:2], lr_inner=0.1)
