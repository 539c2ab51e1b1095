"""ASR / ESR / IRR / SMR from embeddings, cosines, and the FGSM / PGD baselines on tiny random conv nets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax.metrics import recognition


class TinyFR(nn.Module):
  """A small random conv embedder standing in for a surrogate FR model.

  The embedding is centred by `mu` (the mean embedding of random images, set after init), so that, as with trained FR
  models, unrelated faces have cosines near 0 instead of the large common component of a random ReLU net.
  """
  width: int = 16

  @nn.compact
  def __call__(self, x):
    for k in range(3):
      x = nn.relu(nn.Conv(self.width * (k + 1), (3, 3), strides=(2, 2))(x))
    x = nn.Dense(32)(x.reshape(x.shape[0], -1))
    return x - self.variable("consts", "mu", lambda: jnp.zeros(32)).value


def _he_init(abstract, rng):
  """He-normal kernels, zero biases, drawn with numpy (XLA-compiling JAX's RNG costs more than the whole attack)."""
  def init(path, leaf):
    if path[-1].key == "kernel":
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)
  return jax.tree_util.tree_map_with_path(init, abstract)


@pytest.fixture(scope="module")
def surrogates():
  """Three random surrogates as `Partial(apply, variables)`, a clean batch and one target face."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (4, 48, 48, 3)), jnp.float32)
  x_target = jnp.asarray(rng.uniform(-1, 1, (1, 48, 48, 3)), jnp.float32)
  reference = jnp.asarray(rng.uniform(-1, 1, (16, 48, 48, 3)), jnp.float32)
  fns, targets = [], []
  for seed, width in enumerate((8, 12, 16)):
    model = TinyFR(width)
    variables = _he_init(jax.eval_shape(model.init, jax.random.key(0), x[:1]), np.random.default_rng(seed))
    variables = {**variables, "consts": {"mu": jnp.mean(jax.jit(model.apply)(variables, reference), axis=0)}}
    fns.append(jax.tree_util.Partial(model.apply, variables))
    targets.append(jax.jit(model.apply)(variables, x_target)[0])
  return x, fns, targets


def test_cosine_and_rates_against_numpy():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(5, 7)), rng.normal(size=(7,))
  want = a @ b / np.linalg.norm(a, axis=1) / np.linalg.norm(b)
  np.testing.assert_allclose(recognition.cosine(a, b), want, rtol=1e-5)
  np.testing.assert_allclose(recognition.cosine(a, 3 * a), 1.0, rtol=1e-6)
  c = np.array([0.1, 0.3, 0.5, 0.2])
  assert recognition.attack_success_rate(c, 0.25) == 0.5
  assert recognition.attack_success_rate(c, 0.3) == 0.25  # strictly above
  assert recognition.erasure_success_rate(c, 0.3) == 0.5  # strictly below
  with pytest.raises(ValueError, match="empty"):
    recognition.attack_success_rate(np.array([]), 0.1)


def test_success_rates_from_embeddings():
  target = np.array([1.0, 0.0, 0.0])
  adv = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.5]])  # cos ~ 0.995, 0, 0.874
  rec = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.1, 1.0, 0.0]])  # cos 0, 1, ~0.0995
  got = recognition.success_rates(adv, rec, target, tau1=0.5, tau2=0.2)
  assert got["asr"] == pytest.approx(2 / 3) and got["esr"] == pytest.approx(2 / 3)
  assert got["mean_cos_rec"] == pytest.approx((0 + 1 + 0.1 / np.sqrt(1.01)) / 3, rel=1e-5)
  assert "irr" not in got and "smr" not in got  # no sources given


@pytest.mark.parametrize("fn, name", [(recognition.identity_recovery_rate, "IRR"),
                                      (recognition.source_match_rate, "SMR")])
def test_source_rates_count_strictly_above_tau1(fn, name):
  c = np.array([0.1, 0.3, 0.5, 0.2])
  assert fn(c, 0.25) == 0.5
  assert fn(c, 0.3) == 0.25  # strictly above, as ASR
  assert fn(c, 0.6) == 0.0 and fn(c, -1.0) == 1.0
  with pytest.raises(ValueError, match=f"{name} of an empty"):
    fn(np.array([]), 0.1)


def test_success_rates_with_sources():
  target = np.array([1.0, 0.0, 0.0])
  source = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 1.0]])  # per face, unnormalised
  adv = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.5]])
  rec = np.array([[0.0, 3.0, 0.0], [0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
  got = recognition.success_rates(adv, rec, target, tau1=0.5, tau2=0.2, emb_source=source)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  cos_adv_source = np.sum(unit(adv) * unit(source), axis=1)  # ~0.0995, 0, ~0.3714
  cos_rec_source = np.sum(unit(rec) * unit(source), axis=1)  # 1, 0.8, 0
  assert got["smr"] == 0.0 and got["irr"] == pytest.approx(2 / 3)
  assert got["mean_cos_adv_source"] == pytest.approx(cos_adv_source.mean(), rel=1e-5)
  assert got["mean_cos_rec_source"] == pytest.approx(cos_rec_source.mean(), rel=1e-5)
  assert got["asr"] == pytest.approx(2 / 3)  # unchanged by the sources
  with pytest.raises(ValueError, match="one source per protected face"):
    recognition.success_rates(adv, rec, target, 0.5, 0.2, emb_source=source[0])


def _mean_cos(x, fns, targets):
  return np.array([np.asarray(recognition.cosine(f(x), t)) for f, t in zip(fns, targets)])  # [K, N]


def test_pgd_and_fgsm_impersonate_within_the_budget(surrogates):
  x, fns, targets = surrogates
  eps = recognition.EPSILON
  clean = _mean_cos(x, fns, targets)
  x_fgsm = recognition.fgsm(x, fns, targets)
  x_pgd = recognition.pgd(x, fns, targets, num_steps=20)
  x_pgd_rs = recognition.pgd(x, fns, targets, num_steps=20, rng=jax.random.key(3))
  for x_adv in (x_fgsm, x_pgd, x_pgd_rs):
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
    assert float(jnp.min(x_adv)) >= -1.0 and float(jnp.max(x_adv)) <= 1.0
  c_fgsm, c_pgd, c_rs = (_mean_cos(v, fns, targets) for v in (x_fgsm, x_pgd, x_pgd_rs))
  print(f"mean cos to target: clean {clean.mean():.3f}  fgsm {c_fgsm.mean():.3f}  pgd {c_pgd.mean():.3f}  "
        f"pgd+random start {c_rs.mean():.3f}")
  assert c_fgsm.mean() > clean.mean() + 0.2
  assert c_pgd.mean() > clean.mean() + 0.4  # "far above clean" (clean is near 0)
  assert c_pgd.mean() > c_fgsm.mean()
  assert c_rs.mean() > clean.mean() + 0.4
  assert np.all(c_pgd > clean + 0.1)  # every image, every surrogate
  # White-box ASR of PGD (per surrogate and image) at a threshold that clean faces rarely pass.
  tau1 = 0.5
  assert recognition.attack_success_rate(clean.ravel(), tau1) <= 0.25
  assert recognition.attack_success_rate(c_pgd.ravel(), tau1) >= 0.75


def test_pgd_accepts_plain_closures_and_checks_targets(surrogates):
  x, fns, targets = surrogates
  closures = [lambda v, f=f: f(v) for f in fns[:1]]
  x_adv = recognition.pgd(x[:2], closures, targets[:1], num_steps=3)
  assert x_adv.shape == x[:2].shape
  with pytest.raises(ValueError, match="one target embedding per surrogate"):
    recognition.fgsm(x, fns, targets[:2])
