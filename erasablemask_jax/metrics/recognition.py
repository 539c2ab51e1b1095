"""Recognition metrics (ASR, ESR, IRR, SMR) from embeddings and thresholds, and the FGSM / PGD impersonation baselines.

Per SPEC.md, with L2-normalised embeddings and `cos(a, b) = <a/|a|, b/|b|>`:

  ASR = mean_i [ cos(FR(x_adv_i), FR(x_target)) > tau1 ]    tau1: the model's threshold at FAR 0.01
  ESR = mean_i [ cos(FR(x_rec_i), FR(x_target)) < tau2 ]    tau2: the model's threshold at FAR 0.1
  IRR = mean_i [ cos(FR(x_rec_i), FR(x_cov_i)) > tau1 ]     identity recovery: R gives back the source's identity
  SMR = mean_i [ cos(FR(x_adv_i), FR(x_cov_i)) > tau1 ]     source match of the protected face (lower: more private)

With several target images x_target_1..M, `cos(FR(x), FR(x_target))` is the mean of the per-target-image cosines,
`(1/M) sum_j cos(FR(x), FR(x_target_j))` (`target_cosine`): each term is a single-pair score, the kind the thresholds
are calibrated on, and the mean is what the attack maximises (`fr.surrogates.target_embeddings`).

ESR alone is met by any restored face that is not the target (a clean face scores high ESR); IRR asks that the FR
model verify the restored face as the person in the original photo x_cov, at the strict threshold tau1.

Baselines (Table II), targeted impersonation against an ensemble of K surrogate embedding functions:

  L(x) = (1/K) sum_k mean_i (1 - cos(f_k(x_i), t_k))
  FGSM:  x_adv = clip(x - eps * sign(grad_x L(x)), -1, 1)
  PGD:   x_{j+1} = clip(Proj_{|x' - x|_inf <= eps}(x_j - alpha * sign(grad_x L(x_j))), -1, 1),  j < steps

Images are float NHWC in [-1, 1], so the paper's eps = 4/255 on [0, 1] is `EPSILON = 8/255` here. The gradient is of
the batch sum (per-image steps independent of the batch size).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 8.0 / 255.0  # 4/255 on the [0, 1] scale
EmbedFn = Callable[[jax.Array], jax.Array]


def normalize(e: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`e / max(|e|_2, eps)` along the last axis."""
  e = jnp.asarray(e, jnp.float32)
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity: a [N, D] (or [D]) against b [N, D] or [D] (broadcast). Returns [N]."""
  return jnp.sum(normalize(a) * normalize(b), axis=-1)


def target_cosine(emb: np.ndarray, target_emb: np.ndarray) -> np.ndarray:
  """`(1/M) sum_j cos(emb_i, target_emb_j)`: each face's mean cosine over the M target images, `[N]`.

  Args:
    emb: [N, D] embeddings of the faces scored.
    target_emb: [M, D] embeddings of the target images (or [D], one image).

  For unit rows this equals `emb @ mean_j(target_emb_j)`, the trainer's un-normalised mean target; it is not the
  cosine to the normalised mean embedding (which is larger when the target images disagree).
  """
  e = np.asarray(normalize(emb), np.float64)
  t = np.asarray(normalize(np.atleast_2d(target_emb)), np.float64)
  return (e @ t.T).mean(axis=1)


def _fraction(cos: np.ndarray, tau: float, above: bool, name: str) -> float:
  c = np.asarray(cos, np.float64)
  if c.size == 0:
    raise ValueError(f"{name} of an empty set of cosines is undefined")
  return float(np.mean(c > tau if above else c < tau))


def attack_success_rate(cos_adv_target: np.ndarray, tau1: float) -> float:
  """ASR: fraction of `cos(FR(x_adv), FR(x_target))` strictly above tau1."""
  return _fraction(cos_adv_target, tau1, True, "ASR")


def erasure_success_rate(cos_rec_target: np.ndarray, tau2: float) -> float:
  """ESR: fraction of `cos(FR(x_rec), FR(x_target))` strictly below tau2."""
  return _fraction(cos_rec_target, tau2, False, "ESR")


def identity_recovery_rate(cos_rec_source: np.ndarray, tau1: float) -> float:
  """IRR: fraction of `cos(FR(x_rec), FR(x_cov))` strictly above tau1 (the restored face verifies as its source)."""
  return _fraction(cos_rec_source, tau1, True, "IRR")


def source_match_rate(cos_adv_source: np.ndarray, tau1: float) -> float:
  """SMR: fraction of `cos(FR(x_adv), FR(x_cov))` strictly above tau1 (the protected face still verifies as its
  source; lower is more private)."""
  return _fraction(cos_adv_source, tau1, True, "SMR")


def success_rates(emb_adv: np.ndarray, emb_rec: np.ndarray, emb_target: np.ndarray, tau1: float, tau2: float,
                  emb_source: np.ndarray | None = None) -> dict[str, float]:
  """ASR, ESR (and, given the source faces' embeddings, IRR and SMR) and the mean cosines, for one FR model.

  Args:
    emb_adv: [N, D] embeddings of the protected faces.
    emb_rec: [N, D] embeddings of the restored faces.
    emb_target: [D] (one target) or [N, D] (a target per face).
    tau1: ASR / IRR / SMR threshold (FAR 0.01).
    tau2: ESR threshold (FAR 0.1).
    emb_source: [N, D] embeddings of the source faces x_cov, row i the source of face i; None: no IRR / SMR.

  Returns:
    {"asr", "esr", "mean_cos_adv", "mean_cos_rec"}, and with `emb_source` also
    {"irr", "smr", "mean_cos_adv_source", "mean_cos_rec_source"}.
  """
  cos_adv = np.asarray(cosine(emb_adv, emb_target))
  cos_rec = np.asarray(cosine(emb_rec, emb_target))
  out = {"asr": attack_success_rate(cos_adv, tau1), "esr": erasure_success_rate(cos_rec, tau2),
         "mean_cos_adv": float(cos_adv.mean()), "mean_cos_rec": float(cos_rec.mean())}
  if emb_source is not None:
    if np.shape(emb_source) != np.shape(emb_adv):
      raise ValueError(f"emb_source has shape {np.shape(emb_source)}; it needs one source per protected face, "
                       f"{np.shape(emb_adv)}")
    cos_adv_source = np.asarray(cosine(emb_adv, emb_source))
    cos_rec_source = np.asarray(cosine(emb_rec, emb_source))
    out.update({"irr": identity_recovery_rate(cos_rec_source, tau1), "smr": source_match_rate(cos_adv_source, tau1),
                "mean_cos_adv_source": float(cos_adv_source.mean()),
                "mean_cos_rec_source": float(cos_rec_source.mean())})
  return out


def impersonation_loss(x: jax.Array, embed_fns: Sequence[EmbedFn], targets: Sequence[jax.Array]) -> jax.Array:
  """`(1/K) sum_k (1 - cos(f_k(x_i), t_k))` per image: [N]."""
  if len(embed_fns) != len(targets) or not embed_fns:
    raise ValueError(f"need one target embedding per surrogate, got {len(embed_fns)} models, {len(targets)} targets")
  losses = [1.0 - cosine(f(x), t) for f, t in zip(embed_fns, targets)]
  return sum(losses) / len(losses)


def _as_partials(embed_fns: Sequence[EmbedFn]) -> tuple[jax.tree_util.Partial, ...]:
  # A `Partial` is a pytree: its bound arguments (e.g. FR params) are traced jit inputs, its function is static.
  # A plain callable becomes a `Partial` with no arguments; whatever it closes over is a compile-time constant.
  return tuple(f if isinstance(f, jax.tree_util.Partial) else jax.tree_util.Partial(f) for f in embed_fns)


def _grad_sign(x, embed_fns, targets):
  return jnp.sign(jax.grad(lambda v: jnp.sum(impersonation_loss(v, embed_fns, targets)))(x))


@jax.jit
def _fgsm(x, targets, embed_fns, epsilon):
  return jnp.clip(x - epsilon * _grad_sign(x, embed_fns, targets), -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _pgd(x, targets, embed_fns, epsilon, step_size, num_steps, start):
  def step(_, x_adv):
    x_adv = x_adv - step_size * _grad_sign(x_adv, embed_fns, targets)
    return jnp.clip(jnp.clip(x_adv, x - epsilon, x + epsilon), -1.0, 1.0)
  return jax.lax.fori_loop(0, num_steps, step, start)


def fgsm(x: jax.Array, embed_fns: Sequence[EmbedFn], targets: Sequence[jax.Array],
         epsilon: float = EPSILON) -> jax.Array:
  """One signed-gradient step towards the targets (jitted).

  Args:
    x: float [N, H, W, 3] in [-1, 1].
    embed_fns: K surrogate embedding functions x -> [N, D_k] (each resizes / normalises its own input). Pass
      `jax.tree_util.Partial(apply_fn, params)` to keep the weights as jit inputs rather than baked-in constants.
    targets: K target embeddings, [D_k] or [N, D_k].
    epsilon: L_inf budget in [-1, 1] units (default 8/255 = 4/255 on [0, 1]).

  Returns:
    x_adv with `|x_adv - x|_inf <= epsilon`, in [-1, 1].
  """
  return _fgsm(jnp.asarray(x, jnp.float32), tuple(jnp.asarray(t) for t in targets), _as_partials(embed_fns),
               jnp.float32(epsilon))


def pgd(x: jax.Array, embed_fns: Sequence[EmbedFn], targets: Sequence[jax.Array], epsilon: float = EPSILON,
        step_size: float | None = None, num_steps: int = 20, rng: jax.Array | None = None) -> jax.Array:
  """Projected signed-gradient descent on the impersonation loss (jitted; `fgsm` for the arguments).

  Args:
    x: float [N, H, W, 3] in [-1, 1].
    embed_fns: K surrogate embedding functions.
    targets: K target embeddings.
    epsilon: L_inf budget in [-1, 1] units.
    step_size: alpha per step; default `2.5 * epsilon / num_steps` (Madry et al.).
    num_steps: iterations.
    rng: if given, start from a uniform random point of the eps-ball; else from x.

  Returns:
    x_adv with `|x_adv - x|_inf <= epsilon`, in [-1, 1].
  """
  x = jnp.asarray(x, jnp.float32)
  step_size = 2.5 * epsilon / num_steps if step_size is None else step_size
  start = x
  if rng is not None:
    start = jnp.clip(x + jax.random.uniform(rng, x.shape, jnp.float32, -epsilon, epsilon), -1.0, 1.0)
  return _pgd(x, tuple(jnp.asarray(t) for t in targets), _as_partials(embed_fns), jnp.float32(epsilon),
              jnp.float32(step_size), num_steps, start)
