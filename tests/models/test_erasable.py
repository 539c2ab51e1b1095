"""The ErasableMask networks: shapes, jit/grad, and the exact identities the curriculum relies on."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, smoke
from erasablemask_jax.models import ErasableMask, parameter_counts

NUM_ATTRS = 13


def _models(config, **model_overrides):
  for k, v in model_overrides.items():
    config.model[k] = v
  return ErasableMask.from_config(config.model, NUM_ATTRS)


@pytest.fixture(scope="module")
def tiny():
  config = smoke.get_config()
  config.image_size = 32
  models = _models(config)
  variables = models.init(jax.random.key(0), config.image_size, NUM_ATTRS)
  # Non-trivial running statistics, so eval-mode paths are exercised with real normalisation.
  stats = variables["g"]["batch_stats"]
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 0.8 + 0.2 if path[-1].key == "var" else a + 0.02 * jax.random.normal(jax.random.key(1), a.shape),
      stats)
  variables["g"]["batch_stats"] = stats
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1, maxval=1)
  att_a = jnp.array([[1, 0] * 6 + [1], [0, 1] * 6 + [0]], jnp.float32)
  return config, models, variables, x, att_a, att_a[::-1]


@pytest.mark.parametrize("size", [64, 128, 256])
def test_full_width_output_shapes(size):
  config = default.get_config()
  models = _models(config)
  shapes = models.abstract_variables(size, NUM_ATTRS)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  att = jax.ShapeDtypeStruct((2, NUM_ATTRS), jnp.float32)
  (x_adv, x_edit), _ = jax.eval_shape(lambda v, x, a: models.protect(v["g"], v["e_adv"], x, a), shapes, x, att)
  x_rec, _ = jax.eval_shape(lambda v, x, a: models.restore(v["r"], x, a), shapes, x, att)
  logit, att_logits = jax.eval_shape(lambda v, x: models.discriminate(v["d"], x), shapes, x)
  assert x_adv.shape == x_edit.shape == x_rec.shape == (2, size, size, 3)
  assert logit.shape == (2,) and att_logits.shape == (2, NUM_ATTRS)
  feats = jax.eval_shape(lambda v, x: models.generator.apply(v["g"], x, train=False, method="encode"), shapes, x)
  assert [f.shape for f in feats] == [(2, size // 2**(i + 1), size // 2**(i + 1), 64 * 2**i) for i in range(5)]


def test_forward_at_64_is_in_range_and_finite():
  config = smoke.get_config()
  models = _models(config)
  variables = models.init(jax.random.key(0), 64, NUM_ATTRS)
  x = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3), minval=-1, maxval=1)
  (x_adv, x_edit), _ = jax.jit(lambda v, x, a: models.protect(v["g"], v["e_adv"], x, a))(variables, x, jnp.ones((1, 13)))
  chex.assert_tree_all_finite((x_adv, x_edit))
  assert float(jnp.max(jnp.abs(x_adv))) <= 1.0


def test_jit_and_finite_nonzero_gradients(tiny):
  _, models, variables, x, att_a, att_b = tiny

  def loss(e_params, r_params, d_params):
    e_vars = {**variables["e_adv"], "params": e_params}
    (x_adv, _), _ = models.protect(variables["g"], e_vars, x, att_b, train_e=True)
    x_rec, _ = models.restore({**variables["r"], "params": r_params}, x_adv, att_a, train=True)
    logit, att_logits = models.discriminate({"params": d_params}, x_adv)
    return jnp.mean((x_rec - x) ** 2) + jnp.mean(logit) + jnp.mean(att_logits)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
      variables["e_adv"]["params"], variables["r"]["params"], variables["d"]["params"])
  chex.assert_tree_all_finite(grads)
  for g in grads:
    assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(g)) > 0


def test_beta_one_gives_exactly_the_clean_attribute_edit(tiny):
  config, _, variables, x, _, att_b = tiny
  models = _models(config, beta=1.0, gamma=0.3)
  # A perturbation encoder that differs from G_enc must not matter at beta = 1.
  e_vars = jax.tree.map(lambda a: a * 1.7 + 0.1, variables["e_adv"])
  (x_adv, x_edit), _ = jax.jit(lambda g, e: models.protect(g, e, x, att_b))(variables["g"], e_vars)
  expected, _ = jax.jit(lambda g: models.edit(g, x, att_b))(variables["g"])
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(x_edit), np.asarray(expected))


def test_gamma_one_gives_exactly_the_clean_branch(tiny):
  config, _, variables, x, _, att_b = tiny
  models = _models(config, beta=0.5, gamma=1.0)
  e_vars = jax.tree.map(lambda a: a * 1.3, variables["e_adv"])
  (x_adv, x_edit), _ = jax.jit(lambda g, e: models.protect(g, e, x, att_b))(variables["g"], e_vars)
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x_edit))
  models0 = _models(config, beta=0.5, gamma=0.0)
  (x_adv0, _), _ = jax.jit(lambda g, e: models0.protect(g, e, x, att_b))(variables["g"], e_vars)
  assert float(jnp.max(jnp.abs(x_adv0 - x_edit))) > 1e-3  # the perturbation is real when injection is off


def test_fresh_copies_equal_the_generator(tiny):
  _, models, variables, x, att_a, _ = tiny
  g, e, r = variables["g"], variables["e_adv"], variables["r"]
  chex.assert_trees_all_equal(e["params"], g["params"]["enc"])
  chex.assert_trees_all_equal(e["batch_stats"], {"enc_layers_0_bn": e["batch_stats"]["enc_layers_0_bn"],
                                                  **e["batch_stats"]})
  fresh = models.init(jax.random.key(0), 32, NUM_ATTRS)
  chex.assert_trees_all_equal(fresh["e_adv"], {"params": fresh["g"]["params"]["enc"],
                                               "batch_stats": fresh["g"]["batch_stats"]["enc"]})
  chex.assert_trees_all_equal(fresh["r"], fresh["g"])
  x_rec, _ = models.restore(fresh["r"], x, att_a)
  reconstruction, _ = models.edit(fresh["g"], x, att_a)
  np.testing.assert_array_equal(np.asarray(x_rec), np.asarray(reconstruction))
  # The copies are independent buffers: donating or updating one leaves G intact.
  assert fresh["r"]["params"]["enc"]["enc_layers_0_conv"]["kernel"] is not fresh["g"]["params"]["enc"]["enc_layers_0_conv"]["kernel"]


def test_train_mode_updates_only_batch_stats_of_trained_network(tiny):
  _, models, variables, x, _, att_b = tiny
  _, (g_state, e_state) = models.protect(variables["g"], variables["e_adv"], x, att_b, train_e=True)
  chex.assert_trees_all_equal(g_state, variables["g"]["batch_stats"])
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), e_state, variables["e_adv"]["batch_stats"])
  assert max(jax.tree.leaves(diff)) > 0


def test_parameter_counts_at_256():
  counts = parameter_counts(default.get_config())
  assert counts["G_enc"] == counts["E_adv"]
  assert counts["G (G_enc + G_dec)"] == counts["R (restorer)"] == counts["G_enc"] + counts["G_dec"]
  # G_enc by hand: 4x4 convs without bias + BatchNorm scale/bias.
  chans = [3, 64, 128, 256, 512, 1024]
  assert counts["G_enc"] == sum(16 * a * b + 2 * b for a, b in zip(chans, chans[1:]))
  # D's heads dominate: FC(1024*8*8 -> 1024) twice.
  assert counts["D (D_G + D_att)"] > 2 * 1024 * 8 * 8 * 1024


def _leaves_by_path(tree) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_restorer_with_its_own_shortcuts_initialises_from_g_where_shapes_agree(tiny):
  config, _, _, x, att_a, _ = tiny
  models = _models(config, r_shortcut_layers=2)  # G keeps the default 1
  assert models.restorer.shortcut_layers == 2 and models.generator.shortcut_layers == 1
  fresh = models.init(jax.random.key(0), 32, NUM_ATTRS)
  g, r = _leaves_by_path(fresh["g"]), _leaves_by_path(fresh["r"])
  assert g.keys() == r.keys()  # same layer names; only the decoder layer after the extra shortcut widens
  differ = sorted(k for k in g if g[k].shape != r[k].shape)
  assert differ == ["['params']['dec']['dec_layers_2_conv']['kernel']"]
  for k in g:
    if k not in differ:
      np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(g[k]), err_msg=k)
  # G's and D's initial values do not depend on R's structure.
  same_as_g = _models(config).init(jax.random.key(0), 32, NUM_ATTRS)
  chex.assert_trees_all_equal((fresh["g"], fresh["d"]), (same_as_g["g"], same_as_g["d"]))
  x_rec, _ = jax.jit(lambda v: models.restore(v, x, att_a))(fresh["r"])
  assert x_rec.shape == x.shape
  chex.assert_tree_all_finite(x_rec)


def test_restorer_counts_default_to_g_and_old_configs_without_them_load():
  config = smoke.get_config()
  assert (config.model.r_shortcut_layers, config.model.r_inject_layers) == (-1, -1)
  models = ErasableMask.from_config(config.model, NUM_ATTRS)
  assert models.restorer is models.generator
  explicit = _models(smoke.get_config(), r_shortcut_layers=1, r_inject_layers=1)
  assert explicit.restorer is explicit.generator
  old = smoke.get_config()
  del old.model["r_shortcut_layers"], old.model["r_inject_layers"]  # a run's config.json from before the fields
  assert ErasableMask.from_config(old.model, NUM_ATTRS).restorer.shortcut_layers == 1
  injected = _models(smoke.get_config(), r_inject_layers=0)
  assert (injected.restorer.shortcut_layers, injected.restorer.inject_layers) == (1, 0)
