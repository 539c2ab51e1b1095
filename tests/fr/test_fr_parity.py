"""Every zoo architecture and depth equals a PyTorch reference (published key names, random weights, non-trivial
BatchNorm statistics) after conversion: L2-normalised embeddings within 1e-4 max abs (fp32)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_nets as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from erasablemask_jax import convert  # pylint: disable=wrong-import-position
from erasablemask_jax import fr  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.torch

# Deep variants run at batch 1 and op by op (no jit): their blocks share compiled kernels instead of compiling one
# huge program each.
ARCHS = {
    "iresnet18": 2, "iresnet34": 1, "iresnet50": 1, "iresnet100": 1, "iresnet200": 1,
    "ir_50": 1, "ir_100": 1, "ir_152": 1, "ir_se_50": 2, "ir_se_100": 1, "ir_se_152": 1,
    "inception_resnet_v1": 2, "mobilefacenet": 3, "mobilefacenet_sphereface": 3,
}
JIT = {"inception_resnet_v1", "mobilefacenet", "mobilefacenet_sphereface"}


DEEP = {"iresnet100", "iresnet200", "ir_100", "ir_152", "ir_se_100", "ir_se_152"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in DEEP else a for a in sorted(ARCHS)])
def test_embeddings_match_pytorch(arch):
  torch.set_num_threads(2)
  spec = convert.get_arch(arch)
  model = ref.randomise(ref.build(arch), seed=sum(map(ord, arch)), input_shape=spec.input_shape)
  recogniser = fr.from_variables(arch, convert.convert_state_dict(arch, ref.state_dict_numpy(model)))
  prep = recogniser.preprocessing
  h, w = prep.input_size
  # [-1, 1] images as the project holds them; the 112x96 model gets 112x112 images and crops 8 px off each side.
  in_w = 112 if prep.crop_fraction[1] != 1.0 else w
  x = np.random.RandomState(0).uniform(-1, 1, (ARCHS[arch], h, in_w, 3)).astype(np.float32)
  xt = x[:, :, (in_w - w) // 2:(in_w - w) // 2 + w]
  xt = ((xt + 1) / 2 - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())).numpy()
  apply = jax.jit(recogniser.raw_apply_fn) if arch in JIT else recogniser.raw_apply_fn
  raw = np.asarray(apply(recogniser.variables, x))
  assert raw.shape == want.shape == (x.shape[0], recogniser.embedding_size)
  assert np.abs(raw - want).max() <= 1e-4 * np.abs(want).max()
  normalised = np.asarray(recogniser.apply_fn(recogniser.variables, x)) if arch in JIT else (
      raw / np.linalg.norm(raw, axis=1, keepdims=True))
  want = want / np.linalg.norm(want, axis=1, keepdims=True)
  assert np.abs(normalised - want).max() < 1e-4
