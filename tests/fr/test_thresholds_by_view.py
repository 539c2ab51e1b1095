"""Thresholds belong to a view: names, the lookup with its labelled fallbacks (arcface112, peer defaults), storage in
the card, and `erasablemask calibrate --view / --image-size / --run` scoring faces exactly as the training surrogate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from erasablemask_jax import cli
from erasablemask_jax import fr
from erasablemask_jax.data import builders
from erasablemask_jax.fr import calibration
from erasablemask_jax.fr import thresholds
from erasablemask_jax.fr import views
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.fr.surrogates import load_surrogate

SAMPLE = builders.resolve_manual_dir("bundled:sample_faces")
ARC = {"far_0.1": 0.15, "far_0.01": 0.27, "far_0.001": 0.35}
LOOSE = {"far_0.1": 0.16, "far_0.01": 0.28, "far_0.001": 0.36}


def test_view_names():
  assert views.view_name("loose_to_arcface", 128) == "loose_to_arcface@128"
  assert views.parse_view("none@256") == ("none", 256)
  assert views.parse_view(views.ARCFACE112) is None
  for bad in ("loose@128", "none@0", "none", "none@x"):
    with pytest.raises(ValueError, match="INPUT_CROP@SIZE"):
      views.parse_view(bad)
  with pytest.raises(ValueError, match="fr.input_crop"):
    views.view_name("tight", 64)


@pytest.mark.parametrize("args,want", [((None, None, None), "arcface112"), (("loose_to_arcface", 128, None),
                                                                            "loose_to_arcface@128"),
                                       (("none@256", None, None), "none@256")])
def test_resolve_view(args, want):
  assert calibration.resolve_view(*args) == want


@pytest.mark.parametrize("args,message", [(("none", None, None), "needs --image-size"),
                                          ((None, 64, None), "not arcface112"),
                                          (("none@64", 64, None), "names its size"),
                                          (("none", 64, "run"), "drop --view"),
                                          (("loose", 64, None), "INPUT_CROP@SIZE")])
def test_resolve_view_refuses_contradictions(args, message):
  with pytest.raises(calibration.CalibrationError, match=message):
    calibration.resolve_view(*args)


def test_lookup_prefers_the_view_then_labels_the_fallbacks():
  card = {"arch": "ir_152", "thresholds_by_view": {"arcface112": ARC, "loose_to_arcface@32": LOOSE}}
  t = thresholds.lookup(card, 0.01, "loose_to_arcface@32")
  assert (t.value, t.view, t.kind, t.label) == (0.28, "loose_to_arcface@32", "calibrated",
                                                "calibrated on loose_to_arcface@32")
  t = thresholds.lookup(card, 0.01, "none@256")
  assert (t.value, t.view, t.kind) == (0.27, "arcface112", "arcface112 fallback")
  assert t.label == "arcface112 threshold, none@256 not calibrated"
  assert thresholds.lookup(card, 0.01, None).kind == "arcface112 fallback"
  assert thresholds.lookup(card, 0.05, "loose_to_arcface@32") is None  # no FAR 0.05 anywhere
  # Peer defaults: only when asked for, only for a model calibrated on neither view, only for their architectures.
  bare = {"arch": "ir_152"}
  assert thresholds.lookup(bare, 0.01, "loose_to_arcface@32") is None
  t = thresholds.lookup(bare, 0.01, "loose_to_arcface@32", source="peer_default")
  assert (t.value, t.view, t.kind, t.label) == (0.166788, "peer", "peer default", "peer default, not calibrated here")
  assert thresholds.lookup(card, 0.01, "loose_to_arcface@32", source="peer_default").kind == "calibrated"
  assert thresholds.lookup({"arch": "mobilefacenet"}, 0.01, None, source="peer_default") is None
  with pytest.raises(ValueError, match="threshold_source"):
    thresholds.lookup(card, 0.01, None, source="peers")


def test_peer_defaults_are_the_spec_numbers():
  """SPEC.md: ir152 0.1668, irse50 0.2410, facenet 0.4091, mobile_face 0.3016 at FAR 0.01."""
  spec = {"ir152": 0.1668, "irse50": 0.2410, "facenet": 0.4091, "mobile_face": 0.3016}
  for name, value in spec.items():
    assert thresholds.PEER_DEFAULTS[name].thresholds["far_0.01"] == pytest.approx(value, abs=5e-5)
  assert {a: p.peer_name for a, p in thresholds.PEER_DEFAULTS_BY_ARCH.items()} == {
      "ir_152": "ir152", "ir_se_50": "irse50", "inception_resnet_v1": "facenet"}


def test_legacy_card_thresholds_are_arcface112_and_survive_a_view_store():
  legacy = {"arch": "mobilefacenet", "thresholds": ARC, "calibration": {"auc": 0.99}}
  assert thresholds.thresholds_by_view(legacy) == {"arcface112": ARC}
  card = thresholds.store(legacy, "loose_to_arcface@32", LOOSE, {"auc": 0.98})
  assert card["thresholds_by_view"] == {"arcface112": ARC, "loose_to_arcface@32": LOOSE}
  assert card["calibration_by_view"] == {"arcface112": {"auc": 0.99}, "loose_to_arcface@32": {"auc": 0.98}}
  assert card["thresholds"] == ARC  # the compatibility field stays the arcface112 one
  card = thresholds.store(card, "arcface112", LOOSE, {"auc": 0.97})
  assert card["thresholds"] == LOOSE and card["thresholds_by_view"]["arcface112"] == LOOSE


def test_recogniser_threshold_is_strict_and_find_threshold_falls_back():
  recogniser = fr.load_bundled()
  assert recogniser.threshold(0.01) == pytest.approx(recogniser.card["thresholds"]["far_0.01"])
  assert recogniser.threshold(0.01, view="arcface112") == recogniser.threshold(0.01)
  with pytest.raises(KeyError, match="no threshold calibrated on view loose_to_arcface@32"):
    recogniser.threshold(0.01, view="loose_to_arcface@32")
  found = recogniser.find_threshold(0.01, "loose_to_arcface@32")
  assert found.kind == "arcface112 fallback" and found.value == recogniser.threshold(0.01)


def _identities(tmp_path):
  """The sample's identities as an `<image> <identity>` file (identity 9.. people have one photo each)."""
  lines = (SAMPLE / "attributes.csv").read_text().splitlines()
  header = lines[0].split(",")
  col = header.index("identity")
  path = tmp_path / "ids.txt"
  path.write_text("\n".join(f"{l.split(',')[0]} {l.split(',')[col]}" for l in lines[1:]) + "\n")
  return path


def test_attribute_csv_is_an_identity_file(tmp_path):
  assert calibration.read_identities(SAMPLE / "attributes.csv") == calibration.read_identities(_identities(tmp_path))
  assert not calibration.is_pair_list(SAMPLE / "attributes.csv")


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
  dest = tmp_path_factory.mktemp("fr") / "mfn"
  shutil.copytree(fr.bundled_dir(), dest)
  return dest


def test_calibrate_a_run_view_scores_faces_as_the_training_surrogate(model_copy, tmp_path, capsys):
  """`--view loose_to_arcface --image-size 48` on the loose sample crops: the thresholds are the ROC of the training
  surrogate's own embeddings (`load_surrogate(..., "loose_to_arcface", 48)` on the faces read at 48), stored under
  `loose_to_arcface@48` beside the untouched arcface112 ones."""
  arcface_before = fr.load(model_copy).thresholds
  out = tmp_path / "cal.json"
  argv = ["calibrate", "--fr", str(model_copy), "--faces", str(SAMPLE), "--identities", str(SAMPLE / "attributes.csv"),
          "--out", str(out), "--view", "loose_to_arcface", "--image-size", "48", "--store"]
  assert cli.main(argv) == 0
  assert "view loose_to_arcface@48" in capsys.readouterr().out
  result = json.loads(out.read_text())
  assert result["view"] == "loose_to_arcface@48" and result["n_images"] == 28

  surrogate = load_surrogate(str(model_copy), "loose_to_arcface", 48)
  assert surrogate.view == "loose_to_arcface@48"
  prepared = calibration.prepare_pairs(SAMPLE, SAMPLE / "attributes.csv")
  faces = np.stack(calibration.load_faces(prepared["paths"], image_size=48))
  emb = np.asarray(surrogate.embed(uint8_to_minus1_1(faces)))
  want = calibration.metrics_from_embeddings(emb, prepared["genuine"], prepared["impostor"])
  for key, value in want["thresholds"].items():
    assert result["thresholds"][key] == pytest.approx(value, abs=1e-5), key
  # The plain crops give other thresholds: the view matters.
  plain = calibration.metrics_from_embeddings(fr.load(model_copy).embed(faces), prepared["genuine"],
                                              prepared["impostor"])
  assert abs(plain["thresholds"]["far_0.1"] - want["thresholds"]["far_0.1"]) > 1e-3

  model = fr.load(model_copy)
  assert model.threshold(0.01, view="loose_to_arcface@48") == pytest.approx(result["thresholds"]["far_0.01"])
  assert model.thresholds == arcface_before  # arcface112 untouched
  assert model.find_threshold(0.01, surrogate.view).kind == "calibrated"
  card = json.loads((model_copy / "card.json").read_text())
  assert card["calibration_by_view"]["loose_to_arcface@48"]["n_images"] == 28


def test_calibrate_takes_the_view_from_a_run(model_copy, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"image_size": 32, "fr": {"input_crop": "none"}}))
  out = tmp_path / "cal.json"
  assert cli.main(["calibrate", "--fr", str(model_copy), "--faces", str(SAMPLE), "--identities",
                   str(SAMPLE / "attributes.csv"), "--out", str(out), "--run", str(run)]) == 0
  assert json.loads(out.read_text())["view"] == "none@32"


@pytest.mark.parametrize("extra,message", [(["--run", "nope"], "not a training run"),
                                           (["--view", "none"], "needs --image-size"),
                                           (["--view", "none", "--image-size", "32", "--flip"], "without it")])
def test_calibrate_view_errors(model_copy, tmp_path, capsys, extra, message):
  argv = ["calibrate", "--fr", str(model_copy), "--faces", str(SAMPLE), "--identities", str(SAMPLE / "attributes.csv"),
          "--out", str(tmp_path / "c.json"), *extra]
  assert cli.main(argv) == 1
  assert message in capsys.readouterr().err


def test_bundled_model_is_calibrated_on_the_demo_and_study_views():
  """The bundled MobileFaceNet's card has the views of the demo (loose crops at 64) and of the transfer study (128),
  from the 296 CelebA photos aligned by our MTCNN; the demo's surrogates take theirs, labelled calibrated."""
  from erasablemask_jax import config as config_lib

  recogniser = fr.load_bundled()
  assert set(recogniser.thresholds_by_view) == {"arcface112", "loose_to_arcface@64", "loose_to_arcface@128"}
  demo = config_lib.load_config("demo")
  for spec in demo.fr.surrogates:
    surrogate = load_surrogate(spec, demo.fr.input_crop, demo.image_size)
    found = recogniser.find_threshold(demo.fr.tau1_far, surrogate.view)
    assert (surrogate.view, found.kind) == ("loose_to_arcface@64", "calibrated")
    assert 0.2 < found.value < 0.35
