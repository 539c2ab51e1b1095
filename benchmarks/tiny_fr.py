"""A tiny FR network wrapped as surrogates: the stand-in of `step_throughput --fr tiny` and of the trainer's tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from erasablemask_jax import fr
from erasablemask_jax.fr.surrogates import Surrogate


class TinyFR(nn.Module):
  """Two convs and a dense layer: an embedding network small enough for unit tests."""

  features: int = 8
  embedding: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.features, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(self.features * 2, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.embedding)(x.reshape(x.shape[0], -1))


def tiny_surrogates(k: int = 2, size: int = 16, seed: int = 0) -> list[Surrogate]:
  card = {"arch": "tiny", "embedding_size": 16, **fr.Preprocessing(
      input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).to_card()}
  out = []
  for i in range(k):
    module = TinyFR()
    variables = module.init(jax.random.key(seed + i), jnp.zeros((1, size, size, 3)))
    recogniser = fr.Recogniser(module, variables, card)
    out.append(Surrogate(spec=f"tiny{i}", recogniser=recogniser, apply=recogniser.apply_fn))
  return out
