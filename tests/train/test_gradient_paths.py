"""Which loss term's gradient reaches which network, measured on the steps themselves (Eq. 14-16, SPEC.md).

The steps take their optimiser from `StepConfig.tx`; here it is `_recording()`, which leaves the parameters where they
are and keeps the gradient the step computed as its state. Each loss weight is passed as an array, so one jitted step
serves every term: with one weight 1 and the others 0, the recorded gradients are that term's alone. Every layer
(top-level module) of a network a term should reach gets a non-zero gradient from it, and every network it should not
reach gets exactly zero. So a `stop_gradient` that cuts a path (L_era into E_adv, say), a term computed on the wrong
branch (L_adv on the clean edit, R restoring the clean edit), or a frozen network that trains, fails here.

  stage 1: G <- L_rec, L_att^G, L_G;  D <- L_D (all but the attribute head), L_att^D (all but the real/fake head)
  stage 2: E_adv <- L_att^G, L_G, L_perb, L_era, L_adv;  R <- L_era only;  D as in stage 1;  G <- nothing
  stage 3: R <- L_era;  nothing else

Also here: stage 2 scores the noise-pool view of x_adv with the FR models (Sec. "FR inputs" of SPEC.md), and the
trainer's own loop makes E_adv a copy of the trained G_enc and R one of G at the start of stage 2 (`begin_stage2`).

Tiny shapes: 16x16 images, 3-layer networks, two 16x16 FR stand-ins, sigma1 = 0 (the hinge would flatten L_perb).
"""

import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import tiny
from erasablemask_jax.attack import make_attack
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.fr.surrogates import target_embeddings
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train import trainer as trainer_lib
from erasablemask_jax.train.state import begin_stage2, create_train_state

NUM_ATTRS = 13
G_TERMS = ("rec", "att", "g")  # stage 1's L_1
E_TERMS = ("att", "g", "perb", "era", "adv", "rec")  # stage 2's L_2 (L_rec has no path: G is frozen)
WEIGHTS = ("l_rec", "l_att", "l_g", "l_adv", "l_era", "l_perb", "l_att_d")


def _recording() -> optax.GradientTransformation:
  """An optimiser whose update is zero and whose state is the last gradient it was given."""
  return optax.GradientTransformation(init=lambda params: jax.tree.map(jnp.zeros_like, params),
                                      update=lambda grads, state, params=None: (
                                          jax.tree.map(jnp.zeros_like, grads), grads))


def _noise(images, rng):
  """A deterministic stand-in for the noise pool, far from the identity."""
  del rng
  return 0.5 * images + 0.1


def _config():
  return tiny.tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3, "model.dis_layers": 3,
                             "loss.sigma1": 0.0})


def _batch(n=4):
  x = jax.random.uniform(jax.random.key(7), (n, 16, 16, 3), minval=-1.0, maxval=1.0)
  att_a = (jax.random.uniform(jax.random.key(8), (n, NUM_ATTRS)) < 0.5).astype(jnp.float32)
  att_a = att_a.at[:, 0].set(jnp.arange(n) % 2)
  return {"image": x, "att_a": att_a, "att_b": jnp.roll(att_a, 1, axis=0)}


def _perturbed(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def _only(term: str, d_attribute: bool = False) -> dict[str, jax.Array]:
  """Loss weights with `l_{term}` = 1 and every other generator-side weight 0; `l_att_d` as `d_attribute`."""
  weights = {k: jnp.float32(0.0) for k in WEIGHTS}
  if term:
    weights[f"l_{term}"] = jnp.float32(1.0)
  weights["l_att_d"] = jnp.float32(1.0 if d_attribute else 0.0)
  return weights


class Setup:
  """The networks, a stage-2 state whose E_adv and R have moved away from G, and the steps with traced weights."""

  def __init__(self):
    config = _config()
    self.models = ErasableMask.from_config(config.model, NUM_ATTRS)
    self.tx = _recording()
    surrogates = tiny.tiny_surrogates(k=2, size=16)
    self.fr_applies = tuple(s.apply for s in surrogates)
    self.fr_vars = [s.variables for s in surrogates]
    self.targets = target_embeddings(surrogates, uint8_to_minus1_1(tiny.tiny_target(config)))
    self.attack = make_attack("meta_auxiliary", lr_inner=1e-3)
    self.batch = _batch()
    self.stage1_state, self.stage2_state = jax.jit(self._states)(jax.random.key(0))

    def run(fn, weights, state, *args):
      loss = types.SimpleNamespace(sigma1=0.0, epsilon=0.0, **weights)
      cfg = steps_lib.StepConfig(models=self.models, tx=self.tx, loss=loss, fr_applies=self.fr_applies,
                                 attack=self.attack, noise=_noise)
      return fn(cfg, state, self.batch, *args)

    self._run = {stage: jax.jit(functools.partial(run, fn)) for stage, fn in
                 ((1, steps_lib.stage1_step), (2, steps_lib.stage2_step), (3, steps_lib.stage3_step))}

  def _states(self, rng):
    state = create_train_state(self.models, self.tx, rng, 16, NUM_ATTRS, num_surrogates=2)
    params = {**state.d.params}  # a fresh D's logits sit near 0; sharpen its heads so every BCE has a slope
    for head in ("fc_adv_1", "fc_cls_1"):
      params[head] = {**params[head], "kernel": 30.0 * params[head]["kernel"]}
    stage1 = state.replace(d=state.d.replace(params=params))
    state = begin_stage2(stage1, self.tx)
    return stage1, state.replace(
        e_adv=state.e_adv.replace(params=_perturbed(state.e_adv.params, jax.random.key(3), 0.05)),
        r=state.r.replace(params=_perturbed(state.r.params, jax.random.key(4), 0.02)))

  def gradients(self, stage: int, weights) -> dict[str, dict]:
    """The step's gradient of each network (its recording optimiser's state), and the state it returned."""
    state = {1: self.stage1_state, 2: self.stage2_state, 3: self.stage2_state}[stage]
    args = (self.fr_vars, self.targets) if stage == 2 else ()
    new, _ = self._run[stage](weights, state, *args)
    return {name: getattr(new, name).opt_state for name in ("g", "e_adv", "r", "d")}, new


@pytest.fixture(scope="module")
def setup():
  return Setup()


def _reached(grads) -> dict[str, bool]:
  """For each top-level module (layer) of a network: whether any of its parameters has a non-zero gradient."""
  return {layer: any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(sub)) for layer, sub in grads.items()}


def _assert_reaches(grads, network: str, term: str, except_layers=()):
  reached = _reached(grads)
  missing = [layer for layer, hit in reached.items() if not hit and not layer.startswith(tuple(except_layers))]
  assert not missing, f"{term} does not reach {network}'s {missing}"
  for layer in except_layers:
    leaked = [name for name, hit in reached.items() if hit and name.startswith(layer)]
    assert not leaked, f"{term} reaches {network}'s {leaked}, which it should not"


def _assert_zero(grads, network: str, term: str):
  reached = [layer for layer, hit in _reached(grads).items() if hit]
  assert not reached, f"{term} reaches {network} ({reached}), which it should not"


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1 (Eq. 14).

@pytest.mark.parametrize("term", G_TERMS)
def test_stage1_generator_terms_reach_g_only(setup, term):
  grads, _ = setup.gradients(1, _only(term))
  _assert_reaches(grads["g"], "G", f"L_{term}")
  _assert_zero(grads["e_adv"], "E_adv", f"L_{term}")
  _assert_zero(grads["r"], "R", f"L_{term}")
  # D's gradient is its own loss's: the same whichever generator term is on.
  d_alone, _ = setup.gradients(1, _only(""))
  chex.assert_trees_all_equal(grads["d"], d_alone["d"])


@pytest.mark.parametrize("stage", [1, 2])
def test_discriminator_terms_reach_d_only(setup, stage):
  """L_D reaches D's trunk and real/fake head, L_att^D its trunk and attribute head; neither reaches a generator."""
  adv_only, _ = setup.gradients(stage, _only(""))
  _assert_reaches(adv_only["d"], "D", "L_D", except_layers=("fc_cls",))
  both, _ = setup.gradients(stage, _only("", d_attribute=True))
  att = jax.tree.map(lambda a, b: a - b, both["d"], adv_only["d"])
  _assert_reaches(att, "D", "L_att^D", except_layers=("fc_adv",))
  for name in ("g", "e_adv", "r"):
    _assert_zero(both[name], name, "L_D + L_att^D")


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2 (Eq. 15).

@pytest.mark.parametrize("term", E_TERMS)
def test_stage2_terms_reach_the_networks_they_train(setup, term):
  grads, new = setup.gradients(2, _only(term))
  if term == "rec":  # G is frozen: L_rec is logged, with no path to any trained network
    _assert_zero(grads["e_adv"], "E_adv", "L_rec")
  else:
    _assert_reaches(grads["e_adv"], "E_adv", f"L_{term}")
  if term == "era":
    _assert_reaches(grads["r"], "R", "L_era")
  else:
    _assert_zero(grads["r"], "R", f"L_{term}")
  _assert_zero(grads["g"], "G", f"L_{term}")
  chex.assert_trees_all_equal(new.g.params, setup.stage2_state.g.params)  # frozen
  d_alone, _ = setup.gradients(2, _only(""))
  chex.assert_trees_all_equal(grads["d"], d_alone["d"])


def test_stage2_fr_models_score_the_noise_pool_view_of_x_adv(setup):
  """Each surrogate's logged cosine is that of FR_k(noise(x_adv)) to its target, not of FR_k(x_adv)."""
  state, batch, models = setup.stage2_state, setup.batch, setup.models
  _, metrics = setup._run[2](_only("adv"), state, setup.fr_vars, setup.targets)  # pylint: disable=protected-access

  @jax.jit
  def reference(state, fr_vars, targets):
    (x_adv, _), _ = models.protect(state.g.variables, state.e_adv.variables, batch["image"], batch["att_b"],
                                   train_e=True)
    cos = lambda apply, v, t, x: jnp.mean(apply(v, x) @ t)
    return [(cos(a, v, t, _noise(x_adv, None)), cos(a, v, t, x_adv))
            for a, v, t in zip(setup.fr_applies, fr_vars, targets)]

  for k, (with_noise, without) in enumerate(reference(state, setup.fr_vars, setup.targets)):
    np.testing.assert_allclose(float(metrics[f"fr/{k}/cos"]), float(with_noise), rtol=1e-5, atol=1e-5)
    assert abs(float(without) - float(with_noise)) > 1e-3, (float(without), float(with_noise))


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3 (Eq. 16).

def test_stage3_erasure_loss_reaches_r_alone(setup):
  grads, new = setup.gradients(3, _only(""))  # stage 3's loss is L_era whatever the weights
  _assert_reaches(grads["r"], "R", "L_era")
  for name in ("g", "e_adv", "d"):
    _assert_zero(grads[name], name, "L_era")
    chex.assert_trees_all_equal(getattr(new, name).params, getattr(setup.stage2_state, name).params)


# ---------------------------------------------------------------------------------------------------------------------
# The start of stage 2 on the trainer's own path.

def test_trainer_copies_g_into_e_adv_and_r_at_the_start_of_stage2(tmp_path):
  """Three stage-1 steps, no stage-2 step, one stage-3 step: E_adv, which stage 3 leaves alone, ends as the trained
  G_enc (params and statistics) and R one Adam step from the trained G; without the copy both would be G's
  initial values, which three stage-1 steps moved further than that."""
  config = tiny.tiny_config_for_process_tests("3,0,1")
  trainer = trainer_lib.Trainer(config, tmp_path, source=tiny.tiny_source(config, n=16), surrogates=[])
  initial = jax.device_get(trainer.init_state())
  final = jax.device_get(trainer.run())
  restored = trainer.checkpoints.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(trainer.abstract_state()), data=ocp.args.JsonRestore()))["state"]
  g = jax.device_get(restored.g)  # G at the end of stage 1 (frozen after)
  chex.assert_trees_all_equal(final.g.params, g.params)
  chex.assert_trees_all_equal(final.e_adv.params, g.params["enc"])
  chex.assert_trees_all_equal(final.e_adv.batch_stats, g.batch_stats["enc"])
  lr = config.optim.lr
  r_from_g = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final.r.params, g.params)))
  g_moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), initial.g.params, g.params)))
  assert r_from_g <= lr * 1.001  # Adam's first step moves each parameter by at most lr
  assert g_moved > 2.5 * lr  # so R, had it kept G's initial values, would be further than lr from the trained G
  assert int(final.r.opt_state[0].count) == 1  # a fresh Adam state, one stage-3 step old
