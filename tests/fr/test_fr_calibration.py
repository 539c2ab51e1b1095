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


def _smooth_image(seed: int, size: int = 112) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = np.random.RandomState(seed).randint(0, 256, (14, 14, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))


def test_calibrate_reads_16_bit_pngs_and_exif_rotated_jpegs_like_every_command(tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  faces = tmp_path / "faces"
  faces.mkdir()
  gray = _smooth_image(0)[..., 0]
  Image.fromarray(np.stack([gray] * 3, -1)).save(faces / "a8.png")
  Image.fromarray(gray.astype(np.uint16) * 257).save(faces / "a16.png")  # 16-bit grayscale, same picture
  assert Image.open(faces / "a16.png").mode == "I;16"
  upright = _smooth_image(1)
  Image.fromarray(upright).save(faces / "b.jpg", quality=100, subsampling=0)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright picture turned 90 CCW
  Image.fromarray(np.rot90(upright)).save(faces / "b_rot.jpg", quality=100, subsampling=0, exif=exif)
  (tmp_path / "ids.txt").write_text("a8.png 1\na16.png 1\nb.jpg 2\nb_rot.jpg 2\n")

  loaded = dict(zip(["a16", "a8", "b", "b_rot"], calibration.load_faces(sorted(faces.iterdir()))))
  np.testing.assert_array_equal(loaded["a16"], loaded["a8"])
  assert loaded["b_rot"].shape == upright.shape
  assert np.abs(loaded["b_rot"].astype(int) - loaded["b"]).mean() < 2  # upright again (JPEG noise only)

  out = tmp_path / "cal.json"
  assert cli.main(["calibrate", "--fr", "bundled:mobilefacenet", "--faces", str(faces), "--identities",
                   str(tmp_path / "ids.txt"), "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert res["n_genuine"] == 2 and res["n_impostor"] == 4
  assert res["mean_cos"]["genuine"] > 0.99  # both pairs embed as the same picture
