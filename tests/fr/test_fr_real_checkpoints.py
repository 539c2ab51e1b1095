"""The two real MobileFaceNet checkpoints: conversion, PyTorch parity on aligned CelebA crops, and calibration.

Expected figures come from an independent PyTorch evaluation of the same crops (issue 3; flip figures also in
`models/VERIFICATION_SANITY_CHECK.txt`).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_nets as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from erasablemask_jax import fr  # pylint: disable=wrong-import-position
from erasablemask_jax.fr import calibration  # pylint: disable=wrong-import-position
from erasablemask_jax.image_io import uint8_to_minus1_1  # pylint: disable=wrong-import-position
from tools.convert_torch_weights.__main__ import main as convert_main  # pylint: disable=wrong-import-position

pytestmark = [pytest.mark.assets, pytest.mark.torch]

CASES = {
    # arch: (checkpoint, AUC plain, TAR@1e-2 plain, AUC flip, TAR@1e-2 flip)
    "mobilefacenet": ("foamliu_mobilefacenet.pt", 0.9915, 0.950, 0.9923, 0.953),
    "mobilefacenet_sphereface": ("xiaoccer_mobilefacenet_068.ckpt", 0.9893, 0.944, 0.9899, 0.950),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, assets_dir, tmp_path_factory):
  arch = request.param
  ckpt = assets_dir / "models" / CASES[arch][0]
  out = tmp_path_factory.mktemp(arch) / "model"
  assert convert_main(["--arch", arch, "--checkpoint", str(ckpt), "--out", str(out)]) == 0
  recogniser = fr.load(out)
  prepared = calibration.prepare_pairs(
      assets_dir / "images" / "derived_aligned112" / "celeba_wild_identities",
      assets_dir / "images" / "celeba_wild_identities" / "identity_CelebA_subset.txt")
  images = np.stack(calibration.load_faces(prepared["paths"]))
  return arch, ckpt, recogniser, prepared, images


def test_matches_pytorch_on_aligned_crops(converted):
  arch, ckpt, recogniser, _, images = converted
  model = ref.build(arch)
  model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True).get("net_state_dict", None)
                        or torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
  x = images[::10]  # 30 crops
  prep = recogniser.preprocessing
  xt = x.astype(np.float32) / 255.0
  if prep.crop_fraction != (1.0, 1.0):
    xt = xt[:, :, 8:-8, :]  # the 112x96 SphereFace crop of a 112x112 ArcFace crop
  xt = (xt - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())).numpy()
  want = want / np.linalg.norm(want, axis=1, keepdims=True)
  got = recogniser.embed(x)
  assert np.abs(got - want).max() < 1e-4


def test_calibration_reproduces_reference_figures(converted):
  arch, _, recogniser, prepared, images = converted
  _, auc_plain, tar_plain, auc_flip, tar_flip = CASES[arch]
  x = uint8_to_minus1_1(images)
  raw = np.asarray(recogniser._jit_raw(recogniser.variables, x))  # pylint: disable=protected-access
  raw_flip = raw + np.asarray(recogniser._jit_raw(recogniser.variables, x[:, :, ::-1]))  # pylint: disable=protected-access
  for emb, auc, tar in ((raw, auc_plain, tar_plain), (raw_flip, auc_flip, tar_flip)):
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    res = calibration.metrics_from_embeddings(emb, prepared["genuine"], prepared["impostor"])
    assert res["n_genuine"] == 444 and res["n_impostor"] == 43216
    assert abs(res["auc"] - auc) < 0.003, res["auc"]
    assert abs(res["tar_at_far"]["far_0.01"] - tar) < 0.02, res["tar_at_far"]
    assert res["far_achieved"]["far_0.01"] <= 0.01


def test_folded_batchnorm_gives_the_same_embeddings(converted):
  """The trainer's default `fr.fold_batchnorm`: the real network with its BatchNorms folded, on real crops."""
  _, _, recogniser, _, images = converted
  x = images[::30]  # 10 crops
  folded = recogniser.fold_batchnorm()
  assert folded.folded and not folded.variables.get("batch_stats")
  np.testing.assert_allclose(folded.embed(x), recogniser.embed(x), rtol=0, atol=1e-4)
