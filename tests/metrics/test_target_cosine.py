"""Several target images: a face's score is the mean of its per-target-image cosines, which is exactly `e @ t` for the
trainer's target `t`, the mean of the targets' unit embeddings (`fr.surrogates.target_embeddings`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax.metrics import recognition
from erasablemask_jax.fr import surrogates as surrogates_lib


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_mean_of_per_target_cosines(m):
  rng = np.random.default_rng(m)
  faces, targets = rng.normal(size=(7, 16)), rng.normal(size=(m, 16))
  got = recognition.target_cosine(faces, targets)
  want = [np.mean([f @ t / np.linalg.norm(f) / np.linalg.norm(t) for t in targets]) for f in faces]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # For unit rows, e @ mean_j(t_j) is the same number (the trainer's rule) ...
  np.testing.assert_allclose(_unit(faces) @ _unit(targets).mean(0), got, atol=1e-6)
  if m > 1:  # ... and not the cosine to the normalised mean embedding.
    mean = _unit(targets).mean(0)
    assert np.abs(_unit(faces) @ (mean / np.linalg.norm(mean)) - got).max() > 1e-2
  np.testing.assert_allclose(recognition.target_cosine(faces, targets[0]), recognition.target_cosine(faces,
                                                                                                   targets[:1]))


def test_trainer_targets_give_the_mean_of_per_target_cosines():
  class Fake:  # a surrogate whose embeddings are given unit vectors
    def __init__(self, table):
      self.table = table

    def embed(self, index):
      return jnp.asarray(self.table[np.asarray(index)])

  rng = np.random.default_rng(0)
  table = _unit(rng.normal(size=(10, 8))).astype(np.float32)
  (t,) = surrogates_lib.target_embeddings([Fake(table)], np.arange(3))
  faces = table[3:]
  np.testing.assert_allclose(faces @ np.asarray(t), recognition.target_cosine(faces, table[:3]), atol=1e-6)
