"""L1 / MSE on the [0, 1] scale."""

import numpy as np
import pytest

from erasablemask_jax.metrics import quality


def test_l1_mse_on_unit_scale():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  u, v = (x + 1) / 2, (y + 1) / 2
  np.testing.assert_allclose(quality.l1_per_image(x, y), np.abs(u - v).mean(axis=(1, 2, 3)), rtol=1e-6)
  np.testing.assert_allclose(quality.mse_per_image(x, y), ((u - v)**2).mean(axis=(1, 2, 3)), rtol=1e-6)
  assert quality.l1(x, y) == pytest.approx(np.abs(u - v).mean(), rel=1e-6)
  assert quality.mse(x, y) == pytest.approx(((u - v)**2).mean(), rel=1e-6)
  # Black vs white is the full range: L1 = MSE = 1 on [0, 1].
  assert quality.l1(-np.ones((1, 2, 2, 3)), np.ones((1, 2, 2, 3))) == pytest.approx(1.0)
  assert quality.mse(x, x) == 0.0


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="same shape"):
    quality.l1(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 5, 3)))
