"""BatchNorm folded into the preceding convolution gives the same outputs (fr.fold)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax import fr
from erasablemask_jax.fr import fold
from erasablemask_jax.fr.layers import DepthwiseConv, torch_batch_norm
from erasablemask_jax.fr.surrogates import load_surrogate


class _Net(nn.Module):
  """conv (bias) -> BN, depthwise (no bias) -> BN, a BN on a sum (not foldable), a dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(torch_batch_norm(name="bn0")(nn.Conv(8, (3, 3), use_bias=True, name="conv0")(x)))
    h = torch_batch_norm(eps=1e-3, name="bn1")(DepthwiseConv(8, (3, 3), padding=(1, 1), name="dw")(h))
    h = torch_batch_norm(name="bn2")(h + 1.0)
    return nn.Dense(4, name="head")(h.reshape(h.shape[0], -1))


def _randomised(variables, seed):
  """Non-trivial BatchNorm statistics and affine terms."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [a + 0.3 * jnp.abs(jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys)])


def test_fold_equals_unfolded_and_keeps_unfoldable_batchnorms():
  net = _Net()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = _randomised(net.init(jax.random.key(1), x), 2)
  folded, apply = fold.fold_batchnorm(net, variables, x)
  assert set(fold.conv_batchnorm_pairs(net, variables, x)) == {("bn0",), ("bn1",)}
  assert set(folded["batch_stats"]) == {"bn2"} and "bn0" not in folded["params"]
  assert "bias" in folded["params"]["conv0"] and set(folded["folded_bias"]) == {"dw"}
  np.testing.assert_allclose(jax.jit(apply)(folded, x), net.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_fold_bundled_mobilefacenet_same_embeddings_and_gradients():
  recogniser = fr.load_bundled("mobilefacenet")
  x = jax.random.uniform(jax.random.key(3), (2, *recogniser.input_size, 3), minval=-1.0, maxval=1.0)
  folded, apply = fold.fold_batchnorm(recogniser.module, recogniser.variables, x)
  assert not jax.tree.leaves(folded.get("batch_stats", {}))  # every MobileFaceNet BatchNorm follows a conv
  ours = jax.jit(apply)(folded, x)
  np.testing.assert_allclose(ours, recogniser.module.apply(recogniser.variables, x), rtol=1e-4, atol=1e-4)
  t = jnp.ones((ours.shape[-1],)) / ours.shape[-1]
  g_ref = jax.grad(lambda y: jnp.sum(recogniser.module.apply(recogniser.variables, y) @ t))(x)
  g_fold = jax.grad(lambda y: jnp.sum(apply(folded, y) @ t))(x)
  np.testing.assert_allclose(g_fold, g_ref, rtol=1e-4, atol=1e-5)


def test_folded_surrogate_is_the_same_view_of_the_same_network():
  """`load_surrogate(..., fold_batchnorm=True)` (the trainer's default): the mirrored ArcFace-box view of the folded
  network gives the embeddings and input gradients of the unfolded one; folding twice is folding once."""
  plain = load_surrogate("bundled:mobilefacenet@flip", "loose_to_arcface", 64)
  folded = load_surrogate("bundled:mobilefacenet@flip", "loose_to_arcface", 64, fold_batchnorm=True)
  assert folded.recogniser.folded and not plain.recogniser.folded and folded.view == plain.view
  assert folded.recogniser.fold_batchnorm() is folded.recogniser
  x = jax.random.uniform(jax.random.key(4), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
  np.testing.assert_allclose(folded.embed(x), plain.embed(x), rtol=0, atol=1e-4)
  t = plain.embed(x[:1])[0]
  grads = [np.asarray(jax.grad(lambda y, s=s: jnp.sum(s.apply(s.variables, y) @ t))(x)) for s in (plain, folded)]
  # Folding reorders float32 sums: a few of the 24,576 input gradients (|g| ~ 1e-3) move by ~2e-5 on some CPUs, while
  # the gradient as a whole agrees to ~1e-3 relative L2.
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=5e-5)
  assert np.linalg.norm(grads[1] - grads[0]) < 2e-3 * np.linalg.norm(grads[0])
