"""MobileFace V2 (MXNet): the Flax module against an independent float64 executor of its symbol graph, the
converter command end to end, and calibration on the CelebA crops against the reference figures (`MANIFEST.md`).

`_run_graph` below executes `-symbol.json` node by node from the JSON and the `.params` arrays (NCHW, float64, the
input normalisation and every attribute read from the graph), sharing no code with `erasablemask_jax.fr`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from erasablemask_jax import convert
from erasablemask_jax import fr
from erasablemask_jax.convert import mxnet
from erasablemask_jax.fr import calibration
from erasablemask_jax.fr.preprocess import Preprocessing
from erasablemask_jax.fr.preprocess import preprocess
from erasablemask_jax.image_io import uint8_to_minus1_1

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = "models/becauseofai_mobileface_v2"
PARAMS = "MobileFace_Identification_V2-0000.params"
FACES = "images/derived_aligned112/celeba_wild_identities"
IDENTITIES = "images/celeba_wild_identities/identity_CelebA_subset.txt"
# Reference figures of an independent executor of the graph (RGB, cosine of L2-normalised embeddings, no flip).
REF_AUC, REF_TAR_1E2, REF_TAR_1E3 = 0.9834, 0.914, 0.824


def test_card_preprocessing_is_the_graph_normalisation():
  card = convert.get_arch("mobileface_v2").card
  prep = Preprocessing.from_card(card)
  assert prep.input_size == (112, 112) and prep.channel_order == "RGB" and card["embedding_size"] == 256
  pixels = (np.arange(112 * 112 * 3) % 256).astype(np.uint8).reshape(1, 112, 112, 3)  # every value, no resize
  got = np.asarray(preprocess(uint8_to_minus1_1(pixels), prep))
  np.testing.assert_allclose(got, (pixels.astype(np.float64) - 127.5) * 0.0078125, atol=1e-6)


# ----- an independent executor of the symbol graph -----


def _attrs(node: dict) -> dict:
  return node.get("attrs") or node.get("attr") or node.get("param") or {}


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.strip("()[] ").split(",") if v.strip())


def _conv2d(x, w, bias, stride, pad, groups):
  """Grouped NCHW convolution: `y[n, g, o] = sum_{c, a, b} x[n, g, c, s*i + a, s*j + b] * w[g, o, c, a, b]`."""
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
  ho, wo = (h + 2 * pad[0] - kh) // stride[0] + 1, (wd + 2 * pad[1] - kw) // stride[1] + 1
  xg = xp.reshape(n, groups, c // groups, *xp.shape[2:])
  wg = w.reshape(groups, o // groups, cg, kh, kw)
  y = np.zeros((n, groups, o // groups, ho, wo))
  for a in range(kh):
    for b in range(kw):
      patch = xg[:, :, :, a:a + stride[0] * (ho - 1) + 1:stride[0], b:b + stride[1] * (wo - 1) + 1:stride[1]]
      y += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, a, b])
  y = y.reshape(n, o, ho, wo)
  return y if bias is None else y + bias[None, :, None, None]


def _run_graph(graph: dict, params: dict, data: np.ndarray) -> np.ndarray:
  """Executes the graph on NCHW `data` in float64; returns the head's value."""
  values: dict[int, np.ndarray] = {}
  for i, node in enumerate(graph["nodes"]):
    op, a = node["op"], _attrs(node)
    ins = [values[j[0]] for j in node["inputs"]]
    if op == "null":
      name = node["name"]
      values[i] = data if name == "data" else np.asarray(
          params[f"arg:{name}"] if f"arg:{name}" in params else params[f"aux:{name}"], np.float64)
    elif op == "Convolution":
      no_bias = a.get("no_bias", "False") == "True"
      values[i] = _conv2d(ins[0], ins[1], None if no_bias else ins[2], _ints(a.get("stride", "(1, 1)")),
                          _ints(a.get("pad", "(0, 0)")), int(a.get("num_group", "1")))
    elif op == "BatchNorm":
      x, gamma, beta, mean, var = ins
      if a.get("fix_gamma", "True") == "True":  # MXNet's default: gamma fixed at 1
        gamma = np.ones_like(gamma)
      shape = (1, -1) + (1,) * (x.ndim - 2)
      eps = float(a.get("eps", "0.001"))
      values[i] = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) \
          + beta.reshape(shape)
    elif op == "_minus_scalar":
      values[i] = ins[0] - float(a["scalar"])
    elif op == "_mul_scalar":
      values[i] = ins[0] * float(a["scalar"])
    elif op == "_maximum_scalar":
      values[i] = np.maximum(ins[0], float(a["scalar"]))
    elif op == "_minimum_scalar":
      values[i] = np.minimum(ins[0], float(a["scalar"]))
    elif op == "elemwise_add":
      values[i] = ins[0] + ins[1]
    elif op == "Flatten":
      values[i] = ins[0].reshape(ins[0].shape[0], -1)
    elif op == "FullyConnected":
      y = ins[0].reshape(ins[0].shape[0], -1) @ ins[1].T
      values[i] = y if a.get("no_bias", "False") == "True" else y + ins[2]
    else:
      raise NotImplementedError(f"op {op} ({node['name']})")
  return values[graph["heads"][0][0]]


# ----- the real model -----


@pytest.fixture(name="real", scope="module")
def _real(assets_dir, tmp_path_factory):
  """The documented command, run as a subprocess, into a temporary directory; then `fr.load`."""
  out = tmp_path_factory.mktemp("mobileface_v2") / "model"
  checkpoint = assets_dir / MODEL_DIR / PARAMS
  cmd = [sys.executable, "-m", "tools.convert_torch_weights", "--arch", "mobileface_v2", "--checkpoint",
         str(checkpoint), "--out", str(out)]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "checked against MobileFace_Identification_V2-symbol.json" in proc.stdout
  return checkpoint, fr.load(out)


@pytest.mark.assets
def test_converted_card(real):
  checkpoint, recogniser = real
  card = recogniser.card
  assert card["arch"] == "mobileface_v2" and card["embedding_size"] == 256 and card["input_size"] == [112, 112]
  assert card["source"]["sha256"] == "750057619a1eef8acb320339aebf0bbcf191497e1396a361c8aaba517bbe825e"
  assert card["source"]["symbol"]["sha256"] == "9d4f776ecb40772e3eb10338319e4a10a3cd68694dc6ef4e9042c8c4141e658f"
  assert card["source_repository"].startswith("becauseofAI/MobileFace") and "ArcFace" in card["alignment"]
  assert not (checkpoint.parent / "model").exists()


@pytest.mark.assets
def test_matches_numpy_graph_executor(real, assets_dir):
  checkpoint, recogniser = real
  graph = json.loads(checkpoint.with_name("MobileFace_Identification_V2-symbol.json").read_text())
  params = mxnet.read_ndarray_list(checkpoint)
  paths = calibration.prepare_pairs(assets_dir / FACES, assets_dir / IDENTITIES)["paths"][::75]  # 4 crops
  images = np.stack(calibration.load_faces(paths))
  want = _run_graph(graph, params, images.astype(np.float64).transpose(0, 3, 1, 2))
  assert want.shape == (4, 256)
  raw = np.asarray(recogniser.raw_apply_fn(recogniser.variables, uint8_to_minus1_1(images)))
  np.testing.assert_allclose(raw, want, rtol=0, atol=1e-5 * np.abs(want).max())  # float32 rounding
  want = want / np.linalg.norm(want, axis=1, keepdims=True)
  got = recogniser.embed(images)
  assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


@pytest.mark.assets
def test_folded_batchnorm_gives_the_same_embeddings(real, assets_dir):
  """The trainer's default `fr.fold_batchnorm` on the MXNet graph (BatchNorms after convolutions, and others)."""
  _, recogniser = real
  folded = recogniser.fold_batchnorm()
  assert folded.folded and not recogniser.folded
  assert len(jax.tree.leaves(folded.variables)) < len(jax.tree.leaves(recogniser.variables))
  paths = calibration.prepare_pairs(assets_dir / FACES, assets_dir / IDENTITIES)["paths"][::75]
  images = np.stack(calibration.load_faces(paths))
  np.testing.assert_allclose(folded.embed(images), recogniser.embed(images), rtol=0, atol=1e-4)


@pytest.mark.assets
def test_calibration_reproduces_reference_figures(real, assets_dir):
  _, recogniser = real
  res = calibration.calibrate(recogniser, assets_dir / FACES, assets_dir / IDENTITIES)
  assert res["n_images"] == 296 and res["n_genuine"] == 444 and res["n_impostor"] == 43216
  assert abs(res["auc"] - REF_AUC) < 0.002, res["auc"]
  assert abs(res["tar_at_far"]["far_0.01"] - REF_TAR_1E2) < 0.002, res["tar_at_far"]
  assert abs(res["tar_at_far"]["far_0.001"] - REF_TAR_1E3) < 0.005, res["tar_at_far"]
  assert res["far_achieved"]["far_0.01"] <= 0.01
