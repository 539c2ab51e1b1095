"""Tiny stand-ins for tests of the trainer: random face-like data and small FR networks wrapped as surrogates."""

from __future__ import annotations

import numpy as np

from configs import smoke
from erasablemask_jax.data.sources import InMemorySource

from benchmarks.tiny_fr import TinyFR, tiny_surrogates  # noqa: F401  (the tests' FR stand-ins)


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
