"""PyTorch semantics of the zoo's layers: symmetric stride-2 padding, per-channel PReLU, depthwise conv, NCHW flatten."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from erasablemask_jax import convert  # pylint: disable=wrong-import-position
from erasablemask_jax.fr import layers  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.torch


def _apply(module, params, x):
  return np.asarray(module.apply({"params": params}, x))


@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("size", [8, 9])
def test_stride2_conv_pads_symmetrically_like_pytorch(groups, size):
  conv = torch.nn.Conv2d(6, 6, 3, 2, 1, groups=groups, bias=True)
  x = np.random.RandomState(1).randn(2, size, size, 6).astype(np.float32)
  with torch.no_grad():
    want = conv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  params = {"kernel": convert.conv_oihw_to_hwio(conv.weight.detach().numpy()), "bias": conv.bias.detach().numpy()}
  got = _apply(layers.torch_conv(6, 3, 2, 1, groups=groups, bias=True), params, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  if size % 2 == 0 and groups == 1:  # Flax's "SAME" pads (0, 1) at stride 2 on even sizes: a different result.
    same = jax.numpy.asarray(_apply(__import__("flax").linen.Conv(6, (3, 3), 2, "SAME"), params, x))
    assert np.abs(np.asarray(same) - want).max() > 1e-2


def test_prelu_is_per_channel():
  prelu = torch.nn.PReLU(5)
  with torch.no_grad():
    prelu.weight.copy_(torch.linspace(0.05, 0.9, 5))
  x = np.random.RandomState(2).randn(3, 4, 4, 5).astype(np.float32)
  want = prelu(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy().transpose(0, 2, 3, 1)
  got = _apply(layers.PReLU(), {"negative_slope": prelu.weight.detach().numpy()}, x)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_linear_after_nchw_flatten_permutes_weight_not_activations():
  lin = torch.nn.Linear(4 * 3 * 2, 5)
  x = np.random.RandomState(3).randn(2, 3, 2, 4).astype(np.float32)  # NHWC, C=4, H=3, W=2
  want = lin(torch.flatten(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 1)).detach().numpy()
  kernel = convert.linear_after_nchw_flatten(lin.weight.detach().numpy(), (4, 3, 2))
  got = layers.flatten(x) @ kernel + lin.bias.detach().numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(layers.flatten(x) @ convert.linear_to_dense(lin.weight.detach().numpy()) + lin.bias.detach().numpy()
                - want).max() > 1e-3
