"""Member-name parsing, the one-member-per-batch training pool and the evaluation registry."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax import noise


@pytest.mark.parametrize("name,kind,value", [
    ("identity", "identity", None), ("jpeg75", "jpeg", 75.0), ("gauss0.003", "gauss", 0.003),
    ("gauss3e-3", "gauss", 0.003), ("resize0.25", "resize", 0.25), ("median5", "median", 5.0),
    ("rotate30", "rotate", 30.0), ("crop224", "crop", 224.0), ("crop0.875", "crop", 0.875)])
def test_parse_member(name, kind, value):
  m = noise.parse_member(name)
  assert (m.kind, m.value) == (kind, value)


@pytest.mark.parametrize("bad,match", [
    ("blur3", "unknown noise member"), ("jpeg", "needs a parameter"), ("jpeg101", "1..100"),
    ("median4", "odd"), ("identity1", "no parameter"), ("resize0", "> 0")])
def test_parse_member_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    noise.parse_member(bad)


def _tiny_images() -> jax.Array:
  return jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)


def test_train_pool_draws_one_member_per_batch():
  members = ["identity", "jpeg50", "gauss0.003", "resize0.25"]
  pool = jax.jit(noise.make_train_pool(members))
  x = _tiny_images()
  singles = {m: jax.jit(noise.make_transform(m)) for m in members}
  counts = collections.Counter()
  for i in range(12):
    key = jax.random.PRNGKey(i)
    out = pool(x, key)
    member_key = jax.random.split(key)[1]
    matches = [m for m, f in singles.items() if np.allclose(out, f(x, member_key), atol=1e-6)]
    assert len(matches) == 1, (i, matches)
    counts[matches[0]] += 1
  assert set(counts) == set(members), counts
  g = jax.grad(lambda x: pool(x, jax.random.PRNGKey(1)).sum())(x)
  assert bool(jnp.isfinite(g).all())


def test_train_pool_probabilities():
  pool = jax.jit(noise.make_train_pool(["identity", "gauss0.01"], probabilities=[0.0, 1.0]))
  x = _tiny_images()
  for i in range(5):
    assert not np.allclose(pool(x, jax.random.PRNGKey(i)), x)
  with pytest.raises(ValueError, match="probabilities"):
    noise.make_train_pool(["identity"], probabilities=[0.5, 0.5])
  with pytest.raises(ValueError, match="at least one"):
    noise.make_train_pool([])


def test_eval_registry_runs_every_named_transform():
  assert noise.EVAL_TRANSFORMS == ("jpeg50", "gauss0.003", "resize0.5", "median5", "rotate30", "crop224")
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 256, 256, 3), minval=-1, maxval=1)
  for name in noise.EVAL_TRANSFORMS:
    out = jax.jit(noise.get_eval_transform(name))(x, jax.random.PRNGKey(1))
    assert out.shape == x.shape and bool(jnp.isfinite(out).all()), name
    assert float(jnp.abs(out - x).mean()) > 1e-3, name
  libjpeg = noise.get_eval_transform("jpeg50")(x, None)
  in_graph = noise.get_eval_transform("jpeg50", jpeg_mode="ste")(x, None)
  np.testing.assert_array_equal(np.round((libjpeg + 1) * 127.5), np.round((in_graph + 1) * 127.5))
  with pytest.raises(ValueError, match="unknown noise member"):
    noise.get_eval_transform("sharpen2")


def test_train_pool_supports_forward_over_reverse():
  """The meta-auxiliary attack takes Hessian-vector products (jvp of grad) through the noise pool on x_adv."""
  import jax
  import jax.numpy as jnp

  from erasablemask_jax.noise import make_train_pool

  pool = make_train_pool(("identity", "jpeg50", "gauss0.003", "resize0.25"))
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-0.9, maxval=0.9)
  for seed in range(4):
    f = lambda y, seed=seed: jnp.sum(pool(y, jax.random.key(seed)) ** 2)
    _, hvp = jax.jit(lambda y: jax.jvp(jax.grad(f), (y,), (jnp.ones_like(y),)))(x)
    assert bool(jnp.all(jnp.isfinite(hvp))) and float(jnp.abs(hvp).sum()) > 0
