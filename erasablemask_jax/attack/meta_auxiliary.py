"""The meta-auxiliary attack (Algorithm 1, Eq. 9-12) and the ensemble ablation, generic in callables.

Notation. theta are E_adv's parameters (any pytree); G(theta) = `generate(theta)` is the adversarial image x_adv with
everything else (frozen G_enc/G_dec, x_cov, att_b, noise draw) closed over; l_k(x) = `fr_losses[k](x)` is surrogate k's
loss 1 - mean cos(FR_k(x_target), FR_k(noise(x))). With K surrogates, weights w (K,) and inner rate lr:

  L_pri_p(theta) = l_p(G(theta))                                              (Eq. 9)
  theta'_p       = theta - lr * grad L_pri_p(theta)                           (Eq. 10, inner SGD step)
  L_aux_p(theta) = sum_{q != p} w_q l_q(G(theta'_p)) / (K - 1)                (Eq. 10)
  L_adv          = max( sum_p (L_pri_p + L_aux_p) / (2K), epsilon )            (Eq. 12)

The gradient differentiates through the inner step. With g_p = grad L_pri_p(theta), H_p its Hessian and
a_p = grad_theta' [sum_{q != p} w_q l_q(G(theta'))/(K-1)] at theta'_p, the chain rule through theta'_p gives

  grad L_adv = [ sum_p g_p + a_p - lr * H_p a_p ] / (2K)     when the sum exceeds epsilon, else 0,

which is exact (no approximation): H_p a_p is one Hessian-vector product, computed forward-over-reverse (`jax.jvp` of
the inner gradient), which XLA compiles to a faster program than reverse-over-reverse (see
`benchmarks/attack_variants.py`). `first_order=True` drops the H_p a_p term (the inner gradient is stop-gradiented).

The K primaries can be evaluated four ways (`primaries=`), all exact and equal up to rounding:
  "unrolled": a Python loop over p; XLA sees the whole program and may overlap the K passes. The HVP recomputes the
              primal inner gradient, keeping fewer residuals alive.
  "linearize": like "unrolled", but g_p and the linear map v -> H_p v come from one `jax.linearize`, so the inner
              gradient is computed once (fewer FLOPs, the residuals of all K linearisations held longer).
  "vmap":     the K generator passes at theta'_p (and the generator half of each HVP) batched with `jax.vmap`; the
              FR nets are still called one by one (they may be different architectures), each vmapped over the K-1
              images it scores.
  "scan":     a `lax.scan` over p with `lax.switch` selecting the FR nets; the smallest program and peak memory of one
              primary at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Generate = Callable[[PyTree], jax.Array]
FRLoss = Callable[[jax.Array], jax.Array]
# (theta, generate, fr_losses, w) -> (l_adv, grad_theta, aux)
Attack = Callable[[PyTree, Generate, Sequence[FRLoss], jax.Array], tuple[jax.Array, PyTree, dict]]

KINDS = ("meta_auxiliary", "first_order", "ensemble")
PRIMARIES = ("unrolled", "linearize", "vmap", "scan")


def _axpy(a, x: PyTree, y: PyTree) -> PyTree:
  """a * x + y, leaf by leaf."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _index(tree: PyTree, i) -> PyTree:
  return jax.tree.map(lambda a: a[i], tree)


def _hinge(total: jax.Array, epsilon) -> tuple[jax.Array, jax.Array]:
  """max(total, epsilon) of Eq. 12 and whether the loss side is active (total > epsilon; a tie counts as inactive)."""
  active = total > epsilon
  return jnp.where(active, total, jnp.asarray(epsilon, total.dtype)), active


def _mask_tree(tree: PyTree, active: jax.Array) -> PyTree:
  return jax.tree.map(lambda a: jnp.where(active, a, jnp.zeros_like(a)), tree)


def _check_surrogates(fr_losses: Sequence[FRLoss], w: jax.Array, need: int) -> int:
  num = len(fr_losses)
  if num < need:
    raise ValueError(f"the meta-auxiliary attack needs at least {need} surrogate FR losses, got {num}; "
                     "use the 'ensemble' attack for a single surrogate")
  if w is not None and jnp.shape(w) != (num,):
    raise ValueError(f"w must have shape ({num},) (one weight per surrogate), got {jnp.shape(w)}")
  return num


def inner_update(theta: PyTree, generate: Generate, fr_loss: FRLoss, lr_inner, first_order: bool = False) -> PyTree:
  """The inner SGD step of Eq. 10: theta' = theta - lr * grad_theta l_p(G(theta)).

  Args:
    theta: E_adv's parameters.
    generate: theta -> x_adv.
    fr_loss: the primary surrogate's loss l_p.
    lr_inner: the inner learning rate lr.
    first_order: stop-gradient on the inner gradient (theta' then depends on theta only through the identity).

  Returns:
    theta'_p, a pytree like theta.
  """
  g = jax.grad(lambda t: fr_loss(generate(t)))(theta)
  if first_order:
    g = jax.lax.stop_gradient(g)
  return _axpy(-lr_inner, g, theta)


def _aux_loss(p: int, fr_losses: Sequence[FRLoss], w: jax.Array, x: jax.Array) -> jax.Array:
  """sum_{q != p} w_q l_q(x) / (K-1), the auxiliary loss of primary p at an image x."""
  num = len(fr_losses)
  terms = [w[q] * fr_losses[q](x) for q in range(num) if q != p]
  return sum(terms) / (num - 1)


def meta_auxiliary_loss_nested(theta: PyTree, generate: Generate, fr_losses: Sequence[FRLoss], w: jax.Array, *,
                               lr_inner, epsilon=0.0, first_order: bool = False) -> jax.Array:
  """L_adv of Eq. 12 as one scalar function; `jax.grad` of it is the naive nested reverse-mode meta-gradient.

  This is the reference the fast `meta_auxiliary_value_and_grad` is tested against (and a benchmark variant).

  Args:
    theta: E_adv's parameters.
    generate: theta -> x_adv, a pure function.
    fr_losses: K >= 2 surrogate losses x -> scalar.
    w: (K,) the Eq. 11 weights.
    lr_inner: the inner learning rate of Eq. 10.
    epsilon: the hinge of Eq. 12.
    first_order: stop-gradient on each inner gradient.

  Returns:
    The scalar max(sum_p (L_pri_p + L_aux_p) / (2K), epsilon).
  """
  num = _check_surrogates(fr_losses, w, need=2)
  x = generate(theta)
  total = 0.0
  for p in range(num):
    theta_p = inner_update(theta, generate, fr_losses[p], lr_inner, first_order)
    total = total + fr_losses[p](x) + _aux_loss(p, fr_losses, w, generate(theta_p))
  return _hinge(total / (2 * num), epsilon)[0]


def _primary_pass(theta, generate, fr_losses, batched: bool):
  """x = G(theta), each l_p(x), c_p = dl_p/dx and g_p = J_G^T c_p, stacked over p on a leading axis."""
  x, vjp_g = jax.vjp(generate, theta)
  l_pri, cot = zip(*[jax.value_and_grad(loss)(x) for loss in fr_losses])
  cot = jnp.stack(cot)
  if batched:
    g_pri = jax.vmap(lambda c: vjp_g(c)[0])(cot)
  else:
    g_pri = jax.tree.map(lambda *a: jnp.stack(a), *[vjp_g(c)[0] for c in cot])
  return x, jnp.stack(l_pri), cot, g_pri


def _primary_hvp(theta, generate, fr_loss, tangent):
  """H_p v: forward-over-reverse, the jvp of theta -> grad l_p(G(theta)) with tangent v."""
  grad_fn = jax.grad(lambda t: fr_loss(generate(t)))
  return jax.jvp(grad_fn, (theta,), (tangent,))[1]


def _unrolled(theta, generate, fr_losses, w, lr_inner, first_order):
  num = len(fr_losses)
  _, l_pri, _, g_pri = _primary_pass(theta, generate, fr_losses, batched=False)
  grad = jax.tree.map(lambda a: jnp.sum(a, axis=0), g_pri)
  l_aux = []
  for p in range(num):
    theta_p = _axpy(-lr_inner, _index(g_pri, p), theta)
    aux_p = functools.partial(_aux_loss, p, fr_losses, w)
    l_aux_p, g_aux = jax.value_and_grad(lambda t, f=aux_p: f(generate(t)))(theta_p)
    l_aux.append(l_aux_p)
    grad = _axpy(1.0, g_aux, grad)
    if not first_order:
      grad = _axpy(-lr_inner, _primary_hvp(theta, generate, fr_losses[p], g_aux), grad)
  return l_pri, jnp.stack(l_aux), grad


def _vmapped(theta, generate, fr_losses, w, lr_inner, first_order):
  num = len(fr_losses)
  x, l_pri, cot, g_pri = _primary_pass(theta, generate, fr_losses, batched=True)
  theta_all = jax.tree.map(lambda t, g: t[None] - lr_inner * g, theta, g_pri)
  x_all, vjp_all = jax.vjp(jax.vmap(generate), theta_all)

  # Surrogate q scores the K-1 images of the primaries p != q, in one vmapped call.
  l_aux = jnp.zeros((num,), l_pri.dtype)
  cot_all = jnp.zeros_like(x_all)
  for q in range(num):
    others = np.array([p for p in range(num) if p != q])
    l_q, gx_q = jax.vmap(jax.value_and_grad(fr_losses[q]))(x_all[others])
    scale = w[q] / (num - 1)
    l_aux = l_aux.at[others].add(scale * l_q)
    cot_all = cot_all.at[others].add(scale * gx_q)
  g_aux = vjp_all(cot_all)[0]

  step = jax.tree.map(lambda a, b: a + b, g_pri, g_aux)
  if not first_order:
    # H_p a_p = d/de [J_G(theta + e a_p)^T grad l_p(G(theta + e a_p))]: the generator halves batched over p.
    dx_all = jax.vmap(lambda v: jax.jvp(generate, (theta,), (v,))[1])(g_aux)
    dcot = jnp.stack([jax.jvp(jax.grad(fr_losses[p]), (x,), (dx_all[p],))[1] for p in range(num)])

    def vjp_at(t, c):
      return jax.vjp(generate, t)[1](c)[0]

    hvp = jax.vmap(lambda v, c, dc: jax.jvp(vjp_at, (theta, c), (v, dc))[1])(g_aux, cot, dcot)
    step = jax.tree.map(lambda s, h: s - lr_inner * h, step, hvp)
  return l_pri, l_aux, jax.tree.map(lambda a: jnp.sum(a, axis=0), step)


def _scanned(theta, generate, fr_losses, w, lr_inner, first_order):
  num = len(fr_losses)
  _, l_pri, _, g_pri = _primary_pass(theta, generate, fr_losses, batched=False)
  loss_and_grads = [jax.value_and_grad(loss) for loss in fr_losses]
  hvps = [functools.partial(_primary_hvp, generate=generate, fr_loss=loss) for loss in fr_losses]

  def body(grad, p):
    theta_p = _axpy(-lr_inner, _index(g_pri, p), theta)
    x_p, vjp_p = jax.vjp(generate, theta_p)
    l_aux_p = jnp.zeros((), l_pri.dtype)
    cot_p = jnp.zeros_like(x_p)
    for j in range(num - 1):  # the K-1 auxiliaries q = p+1, ..., p+K-1 (mod K)
      q = (p + 1 + j) % num
      l_q, gx_q = jax.lax.switch(q, loss_and_grads, x_p)
      l_aux_p = l_aux_p + w[q] * l_q / (num - 1)
      cot_p = cot_p + (w[q] / (num - 1)) * gx_q
    g_aux = vjp_p(cot_p)[0]
    grad = _axpy(1.0, g_aux, grad)
    if not first_order:
      h = jax.lax.switch(p, [lambda t, v, f=f: f(t, tangent=v) for f in hvps], theta, g_aux)
      grad = _axpy(-lr_inner, h, grad)
    return grad, l_aux_p

  grad0 = jax.tree.map(lambda a: jnp.sum(a, axis=0), g_pri)
  grad, l_aux = jax.lax.scan(body, grad0, jnp.arange(num))
  return l_pri, l_aux, grad


def _linearized(theta, generate, fr_losses, w, lr_inner, first_order):
  num = len(fr_losses)
  x = generate(theta)
  l_pri, l_aux, grad = [], [], None
  for p in range(num):
    grad_fn = jax.grad(lambda t, f=fr_losses[p]: f(generate(t)))
    if first_order:
      g_p, hvp_p = grad_fn(theta), None
    else:
      g_p, hvp_p = jax.linearize(grad_fn, theta)  # the inner gradient, and H_p as a linear map, in one pass
    l_pri.append(fr_losses[p](x))
    theta_p = _axpy(-lr_inner, g_p, theta)
    aux_p = functools.partial(_aux_loss, p, fr_losses, w)
    l_aux_p, g_aux = jax.value_and_grad(lambda t, f=aux_p: f(generate(t)))(theta_p)
    l_aux.append(l_aux_p)
    step = _axpy(1.0, g_aux, g_p)
    if not first_order:
      step = _axpy(-lr_inner, hvp_p(g_aux), step)
    grad = step if grad is None else _axpy(1.0, step, grad)
  return jnp.stack(l_pri), jnp.stack(l_aux), grad


_PRIMARY_IMPLS = {"unrolled": _unrolled, "linearize": _linearized, "vmap": _vmapped, "scan": _scanned}


def meta_auxiliary_value_and_grad(theta: PyTree, generate: Generate, fr_losses: Sequence[FRLoss], w: jax.Array, *,
                                  lr_inner, epsilon=0.0, first_order: bool = False,
                                  primaries: str = "unrolled") -> tuple[jax.Array, PyTree, dict]:
  """L_adv (Eq. 12) and its exact meta-gradient with respect to E_adv's parameters.

  grad = [sum_p g_p + a_p - lr * H_p a_p] / (2K) if sum_p (L_pri_p + L_aux_p) / (2K) > epsilon else 0, with
  g_p = grad L_pri_p(theta), a_p the gradient of the auxiliary loss at theta'_p = theta - lr g_p, and H_p a_p a
  forward-over-reverse Hessian-vector product (see the module docstring). Equal to
  `jax.grad(meta_auxiliary_loss_nested)` up to rounding.

  Args:
    theta: E_adv's parameters (any pytree of float arrays).
    generate: theta -> x_adv, pure; everything else the generator needs is closed over.
    fr_losses: K >= 2 surrogate losses x_adv -> scalar, 1 - mean cos(FR_k(x_target), FR_k(noise(x_adv))).
    w: (K,) the Eq. 11 weights w_q(t) of the auxiliary losses.
    lr_inner: lr of the inner step (Eq. 10).
    epsilon: the hinge of Eq. 12.
    first_order: drop the Hessian term (stop-gradient through the inner gradient).
    primaries: how the K primaries are evaluated: "unrolled", "linearize", "vmap" or "scan" (same result).

  Returns:
    (l_adv, grad, aux): the hinged loss; a pytree like theta; aux = {"l_pri": (K,) each L_pri_p,
    "l_aux": (K,) each L_aux_p, "l_total": the unhinged mean sum_p (L_pri_p + L_aux_p) / (2K)}.
  """
  num = _check_surrogates(fr_losses, w, need=2)
  if primaries not in _PRIMARY_IMPLS:
    raise ValueError(f"unknown primaries={primaries!r}; choose one of {PRIMARIES}")
  w = jnp.asarray(w)
  l_pri, l_aux, grad = _PRIMARY_IMPLS[primaries](theta, generate, fr_losses, w, lr_inner, first_order)
  total = (jnp.sum(l_pri) + jnp.sum(l_aux)) / (2 * num)
  l_adv, active = _hinge(total, epsilon)
  grad = _mask_tree(jax.tree.map(lambda a: a / (2 * num), grad), active)
  return l_adv, grad, {"l_pri": l_pri, "l_aux": l_aux, "l_total": total}


def ensemble_value_and_grad(theta: PyTree, generate: Generate, fr_losses: Sequence[FRLoss], w: jax.Array | None = None,
                            *, epsilon=0.0) -> tuple[jax.Array, PyTree, dict]:
  """The ensemble ablation (paper Sec. V-G1): L = max(mean_k l_k(G(theta)), epsilon) and its gradient.

  Args:
    theta: E_adv's parameters.
    generate: theta -> x_adv.
    fr_losses: K >= 1 surrogate losses.
    w: ignored (the ablation is a plain mean); accepted so every attack has one signature.
    epsilon: the hinge of Eq. 12.

  Returns:
    (l_adv, grad, aux) with aux = {"l_pri": (K,) each l_k(G(theta)), "l_total": their unhinged mean}.
  """
  _check_surrogates(fr_losses, w, need=1)

  def mean_loss(t):
    x = generate(t)
    l_pri = jnp.stack([loss(x) for loss in fr_losses])
    return jnp.mean(l_pri), l_pri

  (total, l_pri), grad = jax.value_and_grad(mean_loss, has_aux=True)(theta)
  l_adv, active = _hinge(total, epsilon)
  return l_adv, _mask_tree(grad, active), {"l_pri": l_pri, "l_total": total}


def make_attack(kind: str, *, lr_inner=2e-5, epsilon=0.0, primaries: str = "unrolled") -> Attack:
  """The attack a config names, as a function (theta, generate, fr_losses, w) -> (l_adv, grad, aux).

  Args:
    kind: "meta_auxiliary" (exact second order, the paper's), "first_order" (meta-auxiliary without the Hessian
      term) or "ensemble" (plain mean, the paper's ablation).
    lr_inner: inner learning rate of Eq. 10 (ignored by "ensemble").
    epsilon: the hinge of Eq. 12.
    primaries: "unrolled", "linearize", "vmap" or "scan", see `meta_auxiliary_value_and_grad` (ignored by "ensemble").

  Returns:
    The attack function.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown attack kind {kind!r}; choose one of {KINDS} (config field attack.kind)")
  if primaries not in PRIMARIES:
    raise ValueError(f"unknown primaries {primaries!r}; choose one of {PRIMARIES} (config field attack.primaries)")
  if kind == "ensemble":
    return functools.partial(ensemble_value_and_grad, epsilon=epsilon)
  return functools.partial(meta_auxiliary_value_and_grad, lr_inner=lr_inner, epsilon=epsilon,
                           first_order=kind == "first_order", primaries=primaries)


def from_config(attack_config, epsilon: float = 0.0) -> Attack:
  """The attack `config.attack` names: `make_attack(kind, lr_inner, primaries)` with `epsilon` (`config.loss`'s)."""
  return make_attack(attack_config.kind, lr_inner=attack_config.lr_inner, epsilon=epsilon,
                     primaries=attack_config.primaries)


def attack_loss(attack: Attack, generate: Generate, fr_losses: Sequence[FRLoss],
                w: jax.Array) -> Callable[[PyTree], tuple[jax.Array, dict]]:
  """Wraps an attack as theta -> (l_adv, aux) whose `jax.grad` is the attack's exact gradient (a custom VJP).

  Lets a trainer write its total loss as l_adv * L_adv(theta) + other terms and take one `jax.grad`. Only theta is
  differentiated; whatever `generate` and `fr_losses` close over is treated as constant.

  Args:
    attack: a function from `make_attack`.
    generate: theta -> x_adv.
    fr_losses: the surrogate losses.
    w: (K,) the Eq. 11 weights.

  Returns:
    theta -> (l_adv, aux); use `jax.grad(..., has_aux=True)`.
  """

  @jax.custom_vjp
  def loss(theta):
    l_adv, _, aux = attack(theta, generate, fr_losses, w)
    return l_adv, aux

  def fwd(theta):
    l_adv, grad, aux = attack(theta, generate, fr_losses, w)
    return (l_adv, aux), grad

  def bwd(grad, cotangent):
    ct_l_adv, _ = cotangent
    return (jax.tree.map(lambda g: (ct_l_adv * g).astype(g.dtype), grad),)

  loss.defvjp(fwd, bwd)
  return loss
