"""Tiny stand-ins for tests of the trainer: random face-like data and small FR networks wrapped as surrogates."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import smoke
from erasablemask_jax import fr
from erasablemask_jax.data.sources import InMemorySource
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


def set_fields(config, **overrides):
  """`config` with each dotted `key=value` set (values keep their Python type, unlike `--config.` overrides)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(**overrides):
  config = smoke.get_config()
  config.noise.train_pool = ("identity",)
  config.optim.lr = 1e-3
  return set_fields(config, **overrides)


def tiny_source(config, n: int = 12, process_index: int = 0, process_count: int = 1, seed: int = 0) -> InMemorySource:
  rng = np.random.default_rng(seed)
  size = config.image_size
  yy, xx = np.mgrid[:size, :size] / size
  base = np.stack([yy, xx, 1 - yy], -1)
  images = np.clip((base[None] * rng.uniform(0.5, 1.0, (n, 1, 1, 3)) + rng.normal(0, 0.05, (n, size, size, 3))) * 255,
                   0, 255).astype(np.uint8)
  attributes = (rng.random((n, 13)) < 0.5).astype(np.float32)
  return InMemorySource(images=images, attributes=attributes, global_batch_size=config.data.batch_size,
                        seed=config.data.shuffle_seed, process_index=process_index, process_count=process_count)


def tiny_target(config, seed: int = 99) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (1, config.image_size, config.image_size, 3), dtype=np.uint8)


def tiny_config_for_process_tests(schedule: str = "1,3,1"):
  """The config shared by the in-process reference run and the subprocess runs: 16x16, 3-layer networks."""
  s1, s2, s3 = (int(v) for v in schedule.split(","))
  config = tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3, "model.dis_layers": 3,
                          "data.batch_size": 8, "schedule.stage1_steps": s1, "schedule.stage2_steps": s2,
                          "schedule.stage3_steps": s3, "train.checkpoint_every_steps": 1,
                          "train.max_checkpoints_to_keep": 100, "train.sample_every_steps": 1000})
  return config
