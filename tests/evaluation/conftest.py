"""The tiny trained run shared by the evaluation tests (trained once per session; see evaluation_helpers)."""

from __future__ import annotations

import pathlib

import pytest

from evaluation_helpers import tiny_run_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
  from erasablemask_jax.train import trainer

  workdir = tmp_path_factory.mktemp("tiny_run")
  trainer.Trainer(tiny_run_config(), workdir).run()
  return workdir


@pytest.fixture(scope="session")
def loaded_run(tiny_run):
  from erasablemask_jax import inference

  return inference.load_run(tiny_run, batch_size=8)
