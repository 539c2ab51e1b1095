"""`evaluate` takes each model's thresholds for the view it scores (the run's `fr.input_crop@image_size`), labels where
they came from (the view's calibration, the arcface112 fallback, a peer default), and scores several target images by
the mean of the per-image cosines."""

import json
import shutil

import numpy as np
import pytest

from erasablemask_jax import cli
from erasablemask_jax import fr
from erasablemask_jax.fr import thresholds
from evaluation_helpers import copy_faces

VIEW = "loose_to_arcface@32"  # the tiny run: 32x32 faces seen through the ArcFace box
ON_VIEW = {"far_0.1": 0.17, "far_0.01": 0.31, "far_0.001": 0.4}
TARGETS = ["deepface_img1.png", "deepface_img2.png", "deepface_img4.png"]  # identity 1, never evaluated here


def _copy(dest, name, card_update):
  shutil.copytree(fr.bundled_dir(), dest)
  card = json.loads((dest / "card.json").read_text())
  card["name"] = name
  card = card_update(card)
  (dest / "card.json").write_text(json.dumps(card))
  return dest


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory, monkeypatch_module):
  base = tmp_path_factory.mktemp("views")
  on_view = _copy(base / "on_view", "on_view", lambda c: thresholds.store(c, VIEW, ON_VIEW, {"auc": 0.9}))
  peer = _copy(base / "peer", "peer", lambda c: {k: v for k, v in c.items()
                                                 if k not in ("thresholds", "thresholds_by_view")})
  # No peer default exists for this architecture: pretend it had one, to see the label reach the report.
  monkeypatch_module.setitem(thresholds.PEER_DEFAULTS_BY_ARCH, "mobilefacenet",
                             thresholds.PeerDefault("mfn", "mfn.pth", "mobilefacenet", {"far_0.01": 0.3,
                                                                                         "far_0.1": 0.2}))
  target = copy_faces(base / "target", TARGETS, with_csv=False)
  out = base / "report"
  rc = cli.main(["evaluate", "--workdir", str(tiny_run), "--fr", "bundled:mobilefacenet", "--blackbox",
                 f"{on_view},{peer}", "--out", str(out), "--data", "bundled:sample_faces", "--identities", "2,3,4",
                 "--max-faces", "4", "--transforms", "", "--pgd-steps", "1", "--target", str(target),
                 "--threshold-source", "peer_default"])
  assert rc == 0
  return out


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def test_thresholds_of_the_scored_view_with_their_source(evaluated):
  report = json.loads((evaluated / "report.json").read_text())
  models = report["models"]
  assert {m["view"] for m in models.values()} == {VIEW}
  on_view, fallback, peer = models["on_view"], models["mobilefacenet_foamliu"], models["peer"]
  assert (on_view["tau1"], on_view["tau2"]) == (0.31, 0.17)
  assert on_view["thresholds"]["tau1"]["label"] == f"calibrated on {VIEW}"
  arcface = fr.load_bundled().thresholds
  assert (fallback["tau1"], fallback["tau2"]) == (arcface["far_0.01"], arcface["far_0.1"])
  assert fallback["thresholds"]["tau1"]["label"] == f"arcface112 threshold, {VIEW} not calibrated"
  assert (peer["tau1"], peer["tau2"]) == (0.3, 0.2)
  assert peer["thresholds"]["tau2"]["label"] == "peer default, not calibrated here"
  for key in ("on_view", "peer"):  # the rates use those thresholds
    data = np.load(evaluated / "embeddings" / f"{key}.npz")
    assert float(data["tau1"]) == models[key]["tau1"]
  md = (evaluated / "report.md").read_text()
  assert f"| view scored | {VIEW} | {VIEW} | {VIEW} |" in md
  assert f"0.3100 (FAR 0.01; calibrated on {VIEW})" in md
  assert f"(FAR 0.1; arcface112 threshold, {VIEW} not calibrated)" in md
  assert "0.2000 (FAR 0.1; peer default, not calibrated here)" in md


def test_cosine_to_several_targets_is_the_mean_of_per_image_cosines(evaluated):
  report = json.loads((evaluated / "report.json").read_text())
  assert report["target_images"] == 3
  assert "mean over the 3 target image(s) of the per-image cosines" in (evaluated / "report.md").read_text()
  for key, tables in report["table2"].items():
    data = np.load(evaluated / "embeddings" / f"{key}.npz")
    target = data["target"].astype(np.float64)
    assert target.shape[0] == 3
    tau1, tau2 = float(data["tau1"]), float(data["tau2"])
    for method, emb in (("clean", "clean"), ("erasablemask", "adv")):
      per_image = data[emb].astype(np.float64) @ target.T  # [N, 3]
      cos = per_image.mean(axis=1)
      assert tables[method]["mean_cos"] == pytest.approx(cos.mean(), abs=1e-6)
      assert tables[method]["asr"] == pytest.approx(np.mean(cos > tau1))
      mean = target.mean(0)
      normalised = data[emb].astype(np.float64) @ (mean / np.linalg.norm(mean))
      assert abs(normalised.mean() - cos.mean()) > 1e-3  # the other rule would give other numbers
    rec = (data["rec"].astype(np.float64) @ target.T).mean(axis=1)
    assert tables["erasablemask"]["esr"] == pytest.approx(np.mean(rec < tau2))


def test_flip_surrogate_takes_the_thresholds_of_the_view_it_scores():
  """The demo's `bundled:mobilefacenet@flip` scores mirrored faces of the demo's view (`loose_to_arcface@64`) and the
  report takes that view's calibration for it, as for the unmirrored network: not the aligned crops' (`arcface112`)
  fallback, and not nothing."""
  from erasablemask_jax import config as config_lib
  from erasablemask_jax.evaluation import report as report_lib

  demo = config_lib.load_config("demo")
  plain, mirrored = report_lib.load_eval_models(["bundled:mobilefacenet", "bundled:mobilefacenet@flip"], [], demo)
  assert mirrored.key.endswith("@flip") and mirrored.whitebox
  card = thresholds.thresholds_by_view(fr.load_bundled().card)["loose_to_arcface@64"]
  for name, far in (("tau1", demo.fr.tau1_far), ("tau2", demo.fr.tau2_far)):
    found = mirrored.thresholds[name]
    assert (found.view, found.kind) == ("loose_to_arcface@64", thresholds.CALIBRATED), name
    assert found.value == pytest.approx(card[thresholds.far_key(far)]) == getattr(plain, name)
  assert mirrored.view == plain.view == "loose_to_arcface@64"
  # It is the mirrored view: the network's embedding of the view's crop, mirrored.
  from erasablemask_jax.fr import views
  faces = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  recogniser = mirrored.surrogate.recogniser
  crops = views.crop_to_box(faces, views.arcface_box_in_loose(), recogniser.input_size)
  np.testing.assert_allclose(np.asarray(mirrored.surrogate.embed(faces)),
                             np.asarray(recogniser.apply_fn(recogniser.variables, crops[:, :, ::-1])), atol=1e-5)
