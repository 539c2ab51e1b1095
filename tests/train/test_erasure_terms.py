"""Eq. 8's hinge scaled with the image size (SPEC.md) and stage 3's optional identity term, checked inside the steps.

- `loss.sigma1_reference_size`: stage 2's L_perb uses `sigma1 * image_size / reference` (0: sigma1 as written);
- `loss.l_era_id > 0`: stage 3 adds `l_era_id * L_id` (R's output vs the source in the surrogates' embeddings) to
  L_era; its value equals a reference built from the public functions, it changes R's gradient exactly by the
  reference term's, and it is absent (the paper's Eq. 16) at 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tiny
from erasablemask_jax import losses
from erasablemask_jax.attack import make_attack
from erasablemask_jax.fr.preprocess import uint8_to_minus1_1
from erasablemask_jax.fr.surrogates import target_embeddings
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train.state import begin_stage2, create_train_state, make_optimizer

NUM_ATTRS = 13


def _setup(sgd=False, **overrides):
  config = tiny.tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3,
                               "model.dis_layers": 3, **overrides})
  models = ErasableMask.from_config(config.model, NUM_ATTRS)
  surrogates = tiny.tiny_surrogates(k=2, size=16)
  tx = optax.sgd(1.0) if sgd else make_optimizer(config.optim)  # SGD: an update is the gradient itself
  cfg = steps_lib.StepConfig(models=models, tx=tx, loss=config.loss, fr_applies=tuple(s.apply for s in surrogates),
                             attack=make_attack("ensemble"), noise=None)
  state = begin_stage2(create_train_state(models, tx, jax.random.key(0), 16, NUM_ATTRS, num_surrogates=2), tx)
  x = jax.random.uniform(jax.random.key(7), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
  att_a = (jax.random.uniform(jax.random.key(8), (4, NUM_ATTRS)) < 0.5).astype(jnp.float32)
  batch = {"image": x, "att_a": att_a, "att_b": jnp.roll(att_a, 1, axis=0)}
  return config, cfg, state, batch, surrogates


def test_scaled_sigma1_keeps_the_per_pixel_budget():
  assert losses.scaled_sigma1(30.0, 256, 256) == 30.0
  assert losses.scaled_sigma1(30.0, 128, 256) == 15.0
  assert losses.scaled_sigma1(30.0, 128, 0) == 30.0  # runs saved before the rule
  per_pixel = lambda size: losses.scaled_sigma1(30.0, size, 256) / np.sqrt(size * size * 3)
  np.testing.assert_allclose(per_pixel(64), per_pixel(256), rtol=1e-12)


def test_stage2_perturbation_hinge_is_scaled_by_image_size():
  # At 16x16 every image pair is closer than 2 * sqrt(768) = 55.4 in L2, so L_perb is the hinge itself.
  for reference, expected in ((256, 1000.0 * 16 / 256), (0, 1000.0)):
    _, cfg, state, batch, surrogates = _setup(**{"loss.sigma1": 1000.0, "loss.sigma1_reference_size": reference})
    fr_vars = [s.variables for s in surrogates]
    targets = target_embeddings(surrogates, uint8_to_minus1_1(np.zeros((1, 16, 16, 3), np.uint8)))
    _, metrics = jax.jit(functools.partial(steps_lib.stage2_step, cfg))(state, batch, fr_vars, targets)
    np.testing.assert_allclose(float(metrics["e/perb"]), expected, rtol=1e-6)


def test_saved_configs_without_the_new_keys_keep_their_old_meaning():
  from erasablemask_jax.config import upgrade_legacy

  saved = {"loss": {"sigma1": 30.0}, "attack": {"kind": "meta_auxiliary", "lr_inner": 1e-4}, "optim": {"lr": 1e-4}}
  upgraded = upgrade_legacy(saved)
  assert upgraded["loss"]["sigma1_reference_size"] == 0 and upgraded["loss"]["l_era_id"] == 0.0


def test_stage3_identity_term_matches_its_reference_and_only_adds_its_own_gradient():
  _, cfg, state, batch, surrogates = _setup(sgd=True, **{"loss.l_era_id": 2.5})
  _, cfg0, _, _, _ = _setup(sgd=True, **{"loss.l_era_id": 0.0})
  fr_vars = [s.variables for s in surrogates]
  models = cfg.models
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  _, metrics = jax.jit(functools.partial(steps_lib.stage3_step, cfg))(state, batch, fr_vars)
  _, metrics0 = jax.jit(functools.partial(steps_lib.stage3_step, cfg0))(state, batch, fr_vars)
  assert "r/id" not in metrics0  # the paper's Eq. 16: L_era alone

  (x_adv, _), _ = models.protect(state.g.variables, state.e_adv.variables, x, att_b)

  def terms(params):
    x_rec, _ = models.restore({"params": params, "batch_stats": state.r.batch_stats}, x_adv, att_a, train=True)
    e_rec = [s.apply(s.variables, x_rec) for s in surrogates]
    e_src = [s.apply(s.variables, x) for s in surrogates]
    cos = [jnp.mean(jnp.sum(r * t, -1)) for r, t in zip(e_rec, e_src)]
    return losses.erasure_loss(x_rec, x), 1.0 - (cos[0] + cos[1]) / 2

  era, identity = terms(state.r.params)
  np.testing.assert_allclose(float(metrics["r/era"]), float(era), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["r/id"]), float(identity), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics0["r/era"]), float(era), rtol=1e-5)

  # R's gradient: the step's loss is L_era + l_era_id * L_id, the source embeddings are constants.
  step_loss = lambda p, w: terms(p)[0] + w * terms(p)[1]
  g_id = jax.grad(lambda p: terms(p)[1])(state.r.params)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_id)) > 1e-6  # the term reaches R
  new, _ = jax.jit(functools.partial(steps_lib.stage3_step, cfg))(state, batch, fr_vars)
  new0, _ = jax.jit(functools.partial(steps_lib.stage3_step, cfg0))(state, batch, fr_vars)
  for w, got in ((2.5, new.r.params), (0.0, new0.r.params)):
    expected = jax.tree.map(lambda p, g: p - g, state.r.params, jax.grad(step_loss)(state.r.params, w))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new.r.params), jax.tree.leaves(new0.r.params))]
  assert max(moved) > 0  # the two losses train R differently
