"""Helpers of the evaluation and inference tests: the tiny run's config (the `tiny_run` fixture of conftest.py trains
it) and copies of bundled sample faces.

32x32 faces, the smoke networks, one stage-1 step and one stage-3 step (stage 2 skipped: its meta-attack compile
through MobileFaceNet is what the train tests cover); the real bundled MobileFaceNet is the run's surrogate, so the
config records it and the FGSM / PGD baselines and the white-box marking use it. Identity 0 is the target.
"""

from __future__ import annotations

import pathlib
import shutil

from configs import smoke
from erasablemask_jax.data import builders

SAMPLE = builders.resolve_manual_dir("bundled:sample_faces")


def tiny_run_config(**overrides):
  config = smoke.get_config()
  config.data.manual_dir = "bundled:sample_faces"
  config.fr.surrogates = ("bundled:mobilefacenet",)
  config.fr.input_crop = "loose_to_arcface"
  config.fr.target = "identity:0"
  config.attack.kind = "ensemble"
  config.data.eval_identities = (2, 3, 4)
  config.noise.train_pool = ("identity",)
  config.schedule.stage1_steps = 1
  config.schedule.stage2_steps = 0
  config.schedule.stage3_steps = 1
  config.train.checkpoint_every_steps = 1000
  config.train.sample_every_steps = 1000
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def copy_faces(dest: pathlib.Path, names: list[str], with_csv: bool = True) -> pathlib.Path:
  """Copies bundled sample faces (and their attributes.csv rows) into `dest`."""
  dest.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copy(SAMPLE / name, dest / name)
  if with_csv:
    lines = (SAMPLE / "attributes.csv").read_text().splitlines()
    keep = [lines[0]] + [l for l in lines[1:] if l.split(",")[0] in names]
    (dest / "attributes.csv").write_text("\n".join(keep) + "\n")
  return dest
