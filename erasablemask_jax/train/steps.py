"""The three curriculum steps (Eq. 14-16) as pure `(state, batch, ...) -> (state, metrics)` functions.

Static dependencies (the networks, the optimiser, the attack, the surrogates' apply functions, the noise pool, the
loss weights) are bound with `functools.partial` by the trainer; the frozen surrogates' variables and the target
embeddings are explicit array arguments, never differentiated. Randomness is `fold_in(state.rng, state.step)`.

A batch is `{"image": (B, H, W, 3) float in [-1, 1], "att_a": (B, A) 0/1, "att_b": (B, A) 0/1}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from erasablemask_jax import losses
from erasablemask_jax.attack import accumulate, attack_loss
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train.state import NetState, TrainState

Array = jax.Array
Metrics = dict[str, Array]
NoiseFn = Callable[[Array, Array], Array]  # (images, rng) -> images


@dataclasses.dataclass(frozen=True, eq=False)
class StepConfig:
  """What the steps need besides arrays, bound statically with `functools.partial` (compared and hashed by identity:
  one jitted step per StepConfig)."""

  models: ErasableMask
  tx: optax.GradientTransformation
  loss: Any  # config.loss (weights, sigma1, epsilon)
  fr_applies: tuple[Callable[[Any, Array], Array], ...] = ()  # (variables, x in [-1, 1]) -> normalised embeddings
  attack: Callable | None = None  # erasablemask_jax.attack.make_attack(...)
  noise: NoiseFn | None = None  # the training noise pool


def _update(net: NetState, grads, tx: optax.GradientTransformation, batch_stats=None) -> NetState:
  updates, opt_state = tx.update(grads, net.opt_state, net.params)
  return NetState(params=optax.apply_updates(net.params, updates),
                  batch_stats=net.batch_stats if batch_stats is None else batch_stats, opt_state=opt_state)


def _rngs(state: TrainState, n: int) -> Sequence[Array]:
  return jax.random.split(jax.random.fold_in(state.rng, state.step), n)


def _discriminator_update(cfg: StepConfig, d: NetState, x_real: Array, x_fake: Array,
                          att_a: Array) -> tuple[NetState, Metrics]:
  """L_D (Eq. 3) + l_att_d * L_att^D (Eq. 4) on real images and stop-gradient fakes."""
  x_fake = jax.lax.stop_gradient(x_fake)

  def loss_fn(params):
    real_logit, real_att = cfg.models.discriminate({"params": params}, x_real)
    fake_logit, _ = cfg.models.discriminate({"params": params}, x_fake)
    l_d = losses.discriminator_adversarial_loss(real_logit, fake_logit)
    l_att_d = losses.attribute_loss(real_att, att_a)
    return l_d + cfg.loss.l_att_d * l_att_d, {"d/adv": l_d, "d/att": l_att_d}

  (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
  return _update(d, grads, cfg.tx), {**metrics, "d/total": total}


def stage1_step(cfg: StepConfig, state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, Metrics]:
  """Stage 1 (Eq. 14): AttGAN training of G = (G_enc, G_dec) and D.

  `L_1 = l_rec * L_rec + l_att * L_att^G + l_G * L_G`, where the generated image is the plain attribute edit
  `x_cov^{att_b}` (there is no E_adv yet).
  """
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  models, w = cfg.models, cfg.loss
  (x_fake, _), _ = models.edit_and_reconstruct(state.g.variables, x, att_a, att_b, train=True)
  d, d_metrics = _discriminator_update(cfg, state.d, x, x_fake, att_a)

  def loss_fn(params):
    (x_fake, x_recon), g_stats = models.edit_and_reconstruct({"params": params, "batch_stats": state.g.batch_stats}, x,
                                                             att_a, att_b, train=True)
    fake_logit, fake_att = models.discriminate({"params": d.params}, x_fake)
    l_rec = losses.reconstruction_loss(x_recon, x)
    l_att = losses.attribute_loss(fake_att, att_b)
    l_g = losses.generator_adversarial_loss(fake_logit)
    total = w.l_rec * l_rec + w.l_att * l_att + w.l_g * l_g
    return total, (g_stats, {"g/rec": l_rec, "g/att": l_att, "g/adv": l_g, "g/total": total})

  (_, (g_stats, g_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.g.params)
  g = _update(state.g, grads, cfg.tx, g_stats)
  return state.replace(step=state.step + 1, g=g, d=d), {**d_metrics, **g_metrics}


def _fr_losses(cfg: StepConfig, fr_vars: Sequence[Any], targets: Sequence[Array]) -> list[Callable[[Array], Array]]:
  """Eq. 9's per-surrogate loss `1 - mean_b cos(FR_k(x), FR_k(x_target))` (targets are mean normalised embeddings)."""
  return [lambda x, apply=apply, v=v, t=t: 1.0 - jnp.mean(apply(v, x) @ t)
          for apply, v, t in zip(cfg.fr_applies, fr_vars, targets)]


def stage2_step(cfg: StepConfig, state: TrainState, batch: dict[str, Array], fr_vars: Sequence[Any],
                targets: Sequence[Array]) -> tuple[TrainState, Metrics]:
  """Stage 2 (Eq. 15): G frozen; E_adv and R trained end to end, and D.

  `L_2 = l_att L_att^G + l_rec L_rec + l_G L_G + l_adv L_adv + l_era L_era + l_perb L_perb`; L_adv is the configured
  attack (meta-auxiliary by default) on the noise-pool view of x_adv; L_rec has no gradient path (G is frozen) and is
  logged.
  """
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  models, w = cfg.models, cfg.loss
  g_vars = state.g.variables
  noise_rng, = _rngs(state, 1)
  noise = cfg.noise or (lambda images, rng: images)
  sigma1 = losses.scaled_sigma1(w.sigma1, x.shape[1], getattr(w, "sigma1_reference_size", 0))

  (x_adv, _), _ = models.protect(g_vars, state.e_adv.variables, x, att_b, train_e=True)
  d, d_metrics = _discriminator_update(cfg, state.d, x, x_adv, att_a)
  fr_losses = _fr_losses(cfg, fr_vars, targets)

  def loss_fn(e_params, r_params):
    def protect(params):
      return models.protect(g_vars, {"params": params, "batch_stats": state.e_adv.batch_stats}, x, att_b,
                            train_e=True)

    (x_adv, x_edit), (_, e_stats) = protect(e_params)
    logit, att_logits = models.discriminate({"params": d.params}, x_adv)
    x_rec, r_stats = models.restore({"params": r_params, "batch_stats": state.r.batch_stats}, x_adv, att_a,
                                    train=True)
    terms = {
        "att": losses.attribute_loss(att_logits, att_b),
        "g": losses.generator_adversarial_loss(logit),
        "perb": losses.perturbation_loss(x_adv, x_edit, sigma1),
        "era": losses.erasure_loss(x_rec, x),
    }
    aux = {}
    if fr_losses:
      generate = lambda params: noise(protect(params)[0][0], noise_rng)
      terms["adv"], aux = attack_loss(cfg.attack, generate, fr_losses, state.adaptive.w)(e_params)
    total = sum(getattr(w, f"l_{k}") * v for k, v in terms.items())
    return total, (e_stats, r_stats, terms, aux)

  (total, (e_stats, r_stats, terms, aux)), (e_grads, r_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.e_adv.params, state.r.params)
  x_recon, _ = models.edit(g_vars, x, att_a)
  metrics = {**d_metrics, **{f"e/{k}": v for k, v in terms.items()}, "e/total": total,
             "e/rec": losses.reconstruction_loss(x_recon, x)}
  adaptive = state.adaptive
  if fr_losses:
    adaptive = accumulate(adaptive, aux["l_pri"])
    for k in range(len(fr_losses)):
      metrics[f"fr/{k}/cos"] = 1.0 - aux["l_pri"][k]
      metrics[f"fr/{k}/w"] = adaptive.w[k]
  state = state.replace(step=state.step + 1, d=d, adaptive=adaptive,
                        e_adv=_update(state.e_adv, e_grads, cfg.tx, e_stats),
                        r=_update(state.r, r_grads, cfg.tx, r_stats))
  return state, metrics


def stage3_step(cfg: StepConfig, state: TrainState, batch: dict[str, Array],
                fr_vars: Sequence[Any] = ()) -> tuple[TrainState, Metrics]:
  """Stage 3 (Eq. 16): R alone on `L_3 = L_era`, with the noise pool on x_adv before R.

  With `loss.l_era_id > 0` (a departure from the paper, off in `default.py`), `L_3 = L_era + l_era_id * L_id`:
  `losses.identity_erasure_loss` of R's output against the source under the surrogates `fr_vars`.
  """
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  l_era_id = getattr(cfg.loss, "l_era_id", 0.0)
  noise_rng, = _rngs(state, 1)
  (x_adv, _), _ = cfg.models.protect(state.g.variables, state.e_adv.variables, x, att_b)
  if cfg.noise is not None:
    x_adv = cfg.noise(x_adv, noise_rng)
  x_adv = jax.lax.stop_gradient(x_adv)
  with_id = bool(l_era_id) and bool(cfg.fr_applies)
  e_source = [jax.lax.stop_gradient(apply(v, x)) for apply, v in zip(cfg.fr_applies, fr_vars)] if with_id else []

  def loss_fn(params):
    x_rec, r_stats = cfg.models.restore({"params": params, "batch_stats": state.r.batch_stats}, x_adv, att_a,
                                        train=True)
    terms = {"era": losses.erasure_loss(x_rec, x)}
    if with_id:
      terms["id"] = losses.identity_erasure_loss([apply(v, x_rec) for apply, v in zip(cfg.fr_applies, fr_vars)],
                                                 e_source)
    return terms["era"] + l_era_id * terms.get("id", 0.0), (r_stats, terms)

  (_, (r_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.r.params)
  return (state.replace(step=state.step + 1, r=_update(state.r, grads, cfg.tx, r_stats)),
          {f"r/{k}": v for k, v in terms.items()})


def sample_images(models: ErasableMask, state: TrainState, batch: dict[str, Array]) -> dict[str, Array]:
  """The PNG grid's columns: x_cov | x_cov^{att_b} | x_adv | x_rec (inference mode)."""
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  (x_adv, x_edit), _ = models.protect(state.g.variables, state.e_adv.variables, x, att_b)
  x_rec, _ = models.restore(state.r.variables, x_adv, att_a)
  return {"x_cov": x, "x_edit": x_edit, "x_adv": x_adv, "x_rec": x_rec}
