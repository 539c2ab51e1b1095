"""What each step feeds to which network and loss, checked against references built from the model's public functions.

Every check compares a step's metric with the value the SPEC prescribes AND asserts that the plausible miswiring (the
other attribute vector, the other image) gives a clearly different value, so each test fails under that mutation:

  - R decodes with the source attributes att_a (stages 2 and 3, and the sample grid);
  - L_att^G scores the generated image against att_b, L_att^D the real image against att_a (stages 1 and 2);
  - D is trained on x_adv in stage 2 (not on the clean edit x_cov^{att_b});
  - L_perb measures x_adv against x_cov^{att_b} (not against x_cov);
  - stage 3 puts the noise pool on x_adv before R.

Tiny shapes: 16x16 images, 3-layer networks, sigma1 = 0 so that L_perb is the plain distance (the hinge would flatten
both the right and the wrong value to sigma1).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from erasablemask_jax import losses
from erasablemask_jax.attack import make_attack, weights_from_history
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train import trainer as trainer_lib
from erasablemask_jax.train.state import begin_stage2, create_train_state, make_optimizer
from erasablemask_jax.fr.surrogates import target_embeddings

NUM_ATTRS = 13
TIGHT = 1e-5  # the step and its reference run the same float32 ops under separate jits
APART = 5e-4  # how far a miswired value must be from the right one for the check to mean anything


def _config(**overrides):
  return tiny.tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3, "model.dis_layers": 3,
                             "loss.sigma1": 0.0, **overrides})


def _noise(images, rng):
  """A deterministic stand-in for the noise pool, far from the identity, so its absence shows in every loss."""
  del rng
  return 0.5 * images + 0.1


def _batch(size=16, n=4):
  x = jax.random.uniform(jax.random.key(7), (n, size, size, 3), minval=-1.0, maxval=1.0)
  att_a = (jax.random.uniform(jax.random.key(8), (n, NUM_ATTRS)) < 0.5).astype(jnp.float32)
  att_a = att_a.at[:, 0].set(jnp.arange(n) % 2)  # consecutive rows differ, so rolling them changes every row
  return {"image": x, "att_a": att_a, "att_b": jnp.roll(att_a, 1, axis=0)}


def _perturbed(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def _sharpened_d(state):
  """D with its heads' last layers scaled up: a fresh D's logits sit near 0, where BCE hardly depends on the labels."""
  params = {**state.d.params}
  for head in ("fc_adv_1", "fc_cls_1"):
    params[head] = {**params[head], "kernel": 30.0 * params[head]["kernel"]}
  return state.replace(d=state.d.replace(params=params))


@pytest.fixture(scope="module")
def stage1():
  """One stage-1 step from a fresh state (with a sharpened D): `(cfg, state before, state after, metrics, batch)`."""
  config = _config()
  models = ErasableMask.from_config(config.model, NUM_ATTRS)
  tx = make_optimizer(config.optim)
  cfg = steps_lib.StepConfig(models=models, tx=tx, loss=config.loss, noise=_noise)
  state = _sharpened_d(create_train_state(models, tx, jax.random.key(0), config.image_size, NUM_ATTRS,
                                          num_surrogates=1))
  batch = _batch()
  new, metrics = jax.jit(functools.partial(steps_lib.stage1_step, cfg))(state, batch)
  return cfg, state, new, metrics, batch


@pytest.fixture(scope="module")
def setup(stage1):
  """A stage-2 state whose E_adv and R have moved away from G (so x_adv differs from x_cov^{att_b}), and its config."""
  cfg, _, state, _, batch = stage1
  state = begin_stage2(state, cfg.tx)
  state = state.replace(e_adv=state.e_adv.replace(params=_perturbed(state.e_adv.params, jax.random.key(3), 0.05)),
                        r=state.r.replace(params=_perturbed(state.r.params, jax.random.key(4), 0.02)))
  return cfg, state, batch


def _close(value, expected, *wrong):
  """`value` equals `expected`, and each miswired alternative is clearly different from it."""
  np.testing.assert_allclose(float(value), float(expected), rtol=TIGHT, atol=TIGHT)
  for alternative in wrong:
    assert abs(float(alternative) - float(expected)) > APART, (float(alternative), float(expected))


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1.

def test_stage1_attribute_losses_use_att_b_on_the_edit_and_att_a_on_real_images(stage1):
  cfg, state, new, metrics, batch = stage1
  models = cfg.models
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]

  @jax.jit
  def reference(state, new):
    (x_edit, x_recon), _ = models.edit_and_reconstruct(state.g.variables, x, att_a, att_b, train=True)
    _, real_att = models.discriminate(state.d.variables, x)
    _, fake_att_old = models.discriminate(state.d.variables, x_edit)
    _, fake_att = models.discriminate(new.d.variables, x_edit)  # G's loss sees the D of this step's update
    a = losses.attribute_loss
    return {"g/att": a(fake_att, att_b), "g/att wrong labels": a(fake_att, att_a),
            "d/att": a(real_att, att_a), "d/att wrong labels": a(real_att, att_b),
            "d/att wrong images": a(fake_att_old, att_a), "g/rec": losses.reconstruction_loss(x_recon, x)}

  ref = reference(state, new)
  _close(metrics["g/att"], ref["g/att"], ref["g/att wrong labels"])
  _close(metrics["d/att"], ref["d/att"], ref["d/att wrong labels"], ref["d/att wrong images"])
  _close(metrics["g/rec"], ref["g/rec"])


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2.

@pytest.fixture(scope="module")
def stage2(setup):
  cfg, state, batch = setup
  models = cfg.models
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  new, metrics = jax.jit(functools.partial(steps_lib.stage2_step, cfg))(state, batch, [], [])

  @jax.jit
  def reference(state, new):
    (x_adv, x_edit), _ = models.protect(state.g.variables, state.e_adv.variables, x, att_b, train_e=True)
    old_d, new_d = state.d.variables, new.d.variables
    real_logit, real_att = models.discriminate(old_d, x)
    adv_logit_old, adv_att_old = models.discriminate(old_d, x_adv)
    edit_logit_old, _ = models.discriminate(old_d, x_edit)
    adv_logit, adv_att = models.discriminate(new_d, x_adv)
    restore = lambda images, att: models.restore(state.r.variables, images, att, train=True)[0]
    a = losses.attribute_loss
    return {
        "d/adv": losses.discriminator_adversarial_loss(real_logit, adv_logit_old),
        "d/adv trained on x_edit": losses.discriminator_adversarial_loss(real_logit, edit_logit_old),
        "d/att": a(real_att, att_a), "d/att wrong labels": a(real_att, att_b), "d/att wrong images": a(adv_att_old, att_a),
        "e/att": a(adv_att, att_b), "e/att wrong labels": a(adv_att, att_a),
        "e/g": losses.generator_adversarial_loss(adv_logit),
        "e/perb": losses.perturbation_loss(x_adv, x_edit, 0.0),
        "e/perb against x_cov": losses.perturbation_loss(x_adv, x, 0.0),
        "e/era": losses.erasure_loss(restore(x_adv, att_a), x),
        "e/era R with att_b": losses.erasure_loss(restore(x_adv, att_b), x),
    }

  return metrics, reference(state, new)


def test_stage2_discriminator_is_trained_on_x_adv(stage2):
  metrics, ref = stage2
  _close(metrics["d/adv"], ref["d/adv"], ref["d/adv trained on x_edit"])


def test_stage2_attribute_losses_use_att_b_on_x_adv_and_att_a_on_real_images(stage2):
  metrics, ref = stage2
  _close(metrics["e/att"], ref["e/att"], ref["e/att wrong labels"])
  _close(metrics["d/att"], ref["d/att"], ref["d/att wrong labels"], ref["d/att wrong images"])
  _close(metrics["e/g"], ref["e/g"])


def test_stage2_perturbation_loss_is_against_the_clean_edit(stage2):
  metrics, ref = stage2
  _close(metrics["e/perb"], ref["e/perb"], ref["e/perb against x_cov"])


def test_stage2_restorer_decodes_with_the_source_attributes(stage2):
  metrics, ref = stage2
  _close(metrics["e/era"], ref["e/era"], ref["e/era R with att_b"])


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3 and the sample grid.

def test_stage3_restorer_sees_noisy_x_adv_and_the_source_attributes(setup):
  cfg, state, batch = setup
  models = cfg.models
  x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
  _, metrics = jax.jit(functools.partial(steps_lib.stage3_step, cfg))(state, batch)

  @jax.jit
  def reference(state):
    (x_adv, _), _ = models.protect(state.g.variables, state.e_adv.variables, x, att_b)
    era = lambda images, att: losses.erasure_loss(models.restore(state.r.variables, images, att, train=True)[0], x)
    return era(_noise(x_adv, None), att_a), era(x_adv, att_a), era(_noise(x_adv, None), att_b)

  expected, without_noise, with_att_b = reference(state)
  _close(metrics["r/era"], expected, without_noise, with_att_b)


def test_sample_grid_restores_with_the_source_attributes(setup):
  cfg, state, batch = setup
  models = cfg.models
  columns = jax.jit(functools.partial(steps_lib.sample_images, models))(state, batch)
  (x_adv, x_edit), _ = models.protect(state.g.variables, state.e_adv.variables, batch["image"], batch["att_b"])
  x_rec, _ = models.restore(state.r.variables, x_adv, batch["att_a"])
  wrong, _ = models.restore(state.r.variables, x_adv, batch["att_b"])
  chex.assert_trees_all_close(columns, {"x_cov": batch["image"], "x_edit": x_edit, "x_adv": x_adv, "x_rec": x_rec},
                              atol=1e-5)
  assert float(jnp.max(jnp.abs(wrong - x_rec))) > APART


# ---------------------------------------------------------------------------------------------------------------------
# The start of stage 2.

def _is_fresh_adam(opt_state, params, tx):
  chex.assert_trees_all_equal(opt_state, tx.init(params))


def test_stage2_starts_with_e_adv_as_g_enc_and_r_as_g_and_fresh_adam(stage1):
  cfg, _, state, _, batch = stage1  # G has trained one step; E_adv and R still hold their initial values
  models, tx = cfg.models, cfg.tx
  # Give E_adv and R a used Adam state and values of their own, which stage 2's start must replace.
  used = lambda net: net.replace(params=_perturbed(net.params, jax.random.key(5), 0.1),
                                 opt_state=tx.update(jax.tree.map(jnp.ones_like, net.params), net.opt_state,
                                                     net.params)[1])
  state = state.replace(e_adv=used(state.e_adv), r=used(state.r))
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.r.params, state.g.params)
  assert max(jax.tree.leaves(diff)) > 0  # R and G differ before, so the equalities below are the copy's doing

  started = jax.jit(functools.partial(begin_stage2, tx=tx))(state)
  g = state.g
  chex.assert_trees_all_equal(started.e_adv.params, g.params["enc"])
  chex.assert_trees_all_equal(started.e_adv.batch_stats, g.batch_stats["enc"])
  chex.assert_trees_all_equal(started.r.params, g.params)
  chex.assert_trees_all_equal(started.r.batch_stats, g.batch_stats)
  _is_fresh_adam(started.e_adv.opt_state, started.e_adv.params, tx)
  _is_fresh_adam(started.r.opt_state, started.r.params, tx)
  chex.assert_trees_all_equal((started.g, started.d, started.step), (state.g, state.d, state.step))
  # Functionally: R(x, att_a) is G's reconstruction.
  x_rec, _ = models.restore(started.r.variables, batch["image"], batch["att_a"])
  x_recon, _ = models.edit(g.variables, batch["image"], batch["att_a"])
  np.testing.assert_array_equal(np.asarray(x_rec), np.asarray(x_recon))


def test_restorer_with_more_shortcuts_starts_from_g_where_shapes_agree_and_trains():
  config = _config(**{"model.r_shortcut_layers": 2})  # G keeps shortcut_layers = 1
  models = ErasableMask.from_config(config.model, NUM_ATTRS)
  surrogates = tiny.tiny_surrogates(k=2, size=16)
  tx = make_optimizer(config.optim)
  cfg = steps_lib.StepConfig(models=models, tx=tx, loss=config.loss, fr_applies=tuple(s.apply for s in surrogates),
                             attack=make_attack("meta_auxiliary", lr_inner=1e-3), noise=_noise)
  state = create_train_state(models, tx, jax.random.key(0), config.image_size, NUM_ATTRS, num_surrogates=2)
  batch = _batch()
  state, _ = jax.jit(functools.partial(steps_lib.stage1_step, cfg))(state, batch)
  started = begin_stage2(state, tx)

  def flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

  g, r_before, r = flat(state.g.variables), flat(state.r.variables), flat(started.r.variables)
  widened = {k for k in r if r[k].shape != g[k].shape}
  assert widened == {"['params']['dec']['dec_layers_2_conv']['kernel']"}  # the layer after the second shortcut
  for k in r:
    expected = r_before[k] if k in widened else g[k]  # G's trained value where it fits, R's own fresh one elsewhere
    np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(expected), err_msg=k)
  _is_fresh_adam(started.r.opt_state, started.r.params, tx)

  target = tiny.tiny_target(config)
  targets = target_embeddings(surrogates, uint8_to_minus1_1(target))
  fr_vars = [s.variables for s in surrogates]
  after2, metrics2 = jax.jit(functools.partial(steps_lib.stage2_step, cfg))(started, batch, fr_vars, targets)
  after3, metrics3 = jax.jit(functools.partial(steps_lib.stage3_step, cfg))(after2, batch)
  chex.assert_tree_all_finite((metrics2, metrics3, after3.r.params))
  for before, after in ((started.r.params, after2.r.params), (after2.r.params, after3.r.params)):
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, after)
    assert min(jax.tree.leaves(moved)) > 0  # every R parameter, copied or fresh, is trained


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 11's cadence in the trainer.

def test_trainer_updates_adaptive_weights_once_per_epoch(tmp_path):
  """Stage 2 of five steps at two steps per epoch: the weights change only at the first step of epochs 2 and 3.

  A checkpoint after every step shows the state: within an epoch the weights stay and the accumulator grows; at an
  epoch's first step the history shifts (loss_prev2 <- loss_prev <- last epoch's mean) and w becomes Eq. 11 of it.
  """
  config = tiny.tiny_config_for_process_tests("1,5,0")
  trainer = trainer_lib.Trainer(config, tmp_path, source=tiny.tiny_source(config, n=16),
                                surrogates=tiny.tiny_surrogates(), target_images=tiny.tiny_target(config))
  assert trainer.source.steps_per_epoch == 2
  trainer.run()
  adaptive = {step: jax.device_get(trainer.checkpoints.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(trainer.abstract_state()), data=ocp.args.JsonRestore()))["state"].adaptive)
              for step in range(1, 7)}
  ones = np.ones(2, np.float32)
  initial_w = np.asarray(weights_from_history(ones, ones))
  np.testing.assert_allclose(initial_w, np.exp(0.5), rtol=1e-6)

  # Checkpoint s holds the state after s steps; stage 2 is steps 2-6, epochs {2, 3}, {4, 5}, {6}.
  assert [int(adaptive[s].count) for s in range(1, 7)] == [0, 1, 2, 1, 2, 1]
  for s in (1, 2, 3):
    np.testing.assert_allclose(adaptive[s].w, initial_w, rtol=1e-6)
    np.testing.assert_allclose(adaptive[s].loss_prev, ones)
  mean1 = adaptive[3].loss_sum / 2
  np.testing.assert_allclose(adaptive[4].loss_prev, mean1, rtol=1e-6)
  np.testing.assert_allclose(adaptive[4].loss_prev2, ones)
  np.testing.assert_allclose(adaptive[4].w, weights_from_history(mean1, ones), rtol=1e-6)
  chex.assert_trees_all_equal(adaptive[5].w, adaptive[4].w)  # no update inside an epoch
  mean2 = adaptive[5].loss_sum / 2
  np.testing.assert_allclose(adaptive[6].loss_prev, mean2, rtol=1e-6)
  np.testing.assert_allclose(adaptive[6].loss_prev2, mean1, rtol=1e-6)
  np.testing.assert_allclose(adaptive[6].w, weights_from_history(mean2, mean1), rtol=1e-6)
  assert float(np.max(np.abs(adaptive[6].w - adaptive[4].w))) > 0
