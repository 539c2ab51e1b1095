"""Calibration maths on synthetic scores, and `erasablemask calibrate` end to end on the deepface pair list."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from erasablemask_jax import cli
from erasablemask_jax import fr
from erasablemask_jax.fr import calibration


def test_roc_metrics_thresholds_and_auc():
  rng = np.random.RandomState(0)
  gen, imp = rng.normal(0.6, 0.15, 500), rng.normal(0.0, 0.1, 5000)
  res = calibration.roc_metrics(gen, imp)
  brute = np.mean(gen[:, None] > imp[None, :]) + 0.5 * np.mean(gen[:, None] == imp[None, :])
  assert abs(res["auc"] - brute) < 1e-9
  for far in calibration.FARS:
    key = calibration.far_key(far)
    t = res["thresholds"][key]
    assert np.mean(imp > t) <= far < np.mean(imp >= t) + 1.0 / len(imp)
    assert res["tar_at_far"][key] == pytest.approx(np.mean(gen > t))
  with pytest.raises(calibration.CalibrationError):
    calibration.roc_metrics(gen, [])


def test_calibrate_cli_on_pair_list(assets_dir, tmp_path, capsys):
  model = tmp_path / "mfn"
  shutil.copytree(fr.bundled_dir("mobilefacenet"), model)
  out = tmp_path / "cal.json"
  argv = ["calibrate", "--fr", str(model), "--faces", str(assets_dir / "images/derived_aligned112/deepface_pairs"),
          "--identities", str(assets_dir / "images/deepface_pairs/master.csv"), "--out", str(out), "--store"]
  assert cli.main(argv) == 0
  res = json.loads(out.read_text())
  assert res["n_genuine"] == 38 and res["n_impostor"] == 262 and res["auc"] > 0.99
  assert out.with_suffix(".png").stat().st_size > 1000
  assert fr.load(model).threshold(0.01) == pytest.approx(res["thresholds"]["far_0.01"])
  assert cli.main(argv[:2] + [str(tmp_path / "nope")] + argv[3:]) == 1
  assert "not a converted model directory" in capsys.readouterr().err


def test_bundled_model_card():
  card = fr.load_bundled("mobilefacenet").card
  assert card["source"]["sha256"] == "90a00ba1d8b0b688af3deb731ed53dca582e6106805d1bc3cfdef55f570493f4"
  assert (fr.bundled_dir("mobilefacenet") / "LICENSE").read_text().startswith("\n                                 Apache")
  assert 0.2 < card["thresholds"]["far_0.01"] < 0.35
