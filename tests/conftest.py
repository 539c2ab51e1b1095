"""Shared fixtures: where the shared assets are, and skips when they are absent."""

from __future__ import annotations

import os
import pathlib
import tempfile

# One XLA compilation cache for the whole session, shared with the subprocesses tests start (trainer runs on 1 and
# 8 devices, kill/resume): the same programs are compiled once. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="erasablemask-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite runs on the CPU. With the `tpu` extra installed (CI installs it, for the TPU compile tests), JAX would
# otherwise look for a TPU first in every process and libtpu would print that it finds none.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS_DIR = pathlib.Path(os.environ.get("ERASABLEMASK_ASSETS", REPO_ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> pathlib.Path:
  """`../shared/assets` (or $ERASABLEMASK_ASSETS); skips the test with the reason when it is absent."""
  if not (ASSETS_DIR / "MANIFEST.md").is_file():
    pytest.skip(f"shared assets not found at {ASSETS_DIR} (set ERASABLEMASK_ASSETS or place ../shared beside the repo)")
  return ASSETS_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
  """The tiny trained run of the evaluation and inference tests (`evaluation_helpers.tiny_run_config`), trained once
  per session."""
  from evaluation_helpers import tiny_run_config
  from erasablemask_jax.train import trainer

  workdir = tmp_path_factory.mktemp("tiny_run")
  trainer.Trainer(tiny_run_config(), workdir).run()
  return workdir


@pytest.fixture(scope="session")
def loaded_run(tiny_run):
  from erasablemask_jax import inference

  return inference.load_run(tiny_run, batch_size=8)
