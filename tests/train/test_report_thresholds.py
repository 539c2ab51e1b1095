"""The training report takes each surrogate's thresholds for the view it scores and says where they came from (the
view's calibration, the arcface112 fallback, a peer default, none); cosines to several target images are the mean of
the per-image cosines."""

import dataclasses
import json

import numpy as np
import pytest

import tiny
from erasablemask_jax.config import ConfigError
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.train import report as report_lib
from erasablemask_jax.train import trainer as trainer_lib

VIEW = "none@16"
ON_VIEW = {"far_0.01": 0.4, "far_0.1": 0.2}
ARCFACE = {"far_0.01": 0.5, "far_0.1": 0.3}


def _config(**overrides):
  return tiny.tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3, "model.dis_layers": 3,
                             "data.batch_size": 4, **overrides})


def _surrogates():
  """Four tiny surrogates of view none@16: calibrated on it; calibrated on arcface112 only; an ir_152 (peer default)
  never calibrated; a tiny arch never calibrated."""
  out = [dataclasses.replace(s, view=VIEW) for s in tiny.tiny_surrogates(k=4, size=16)]
  out[0].recogniser.card["thresholds_by_view"] = {VIEW: dict(ON_VIEW), "arcface112": dict(ARCFACE)}
  out[1].recogniser.card["thresholds"] = dict(ARCFACE)
  out[2].recogniser.card["arch"] = "ir_152"
  return out


def _target(config, m=3):
  rng = np.random.default_rng(5)
  return rng.integers(0, 256, (m, config.image_size, config.image_size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
  config = _config(**{"fr.threshold_source": "peer_default"})
  surrogates = _surrogates()
  trainer = trainer_lib.Trainer(config, tmp_path_factory.mktemp("run"), source=tiny.tiny_source(config, n=8),
                                surrogates=surrogates, target_images=_target(config))
  state = trainer.init_state()
  return trainer, report_lib.whitebox_report(trainer.models, state, trainer.surrogates, trainer.targets,
                                             config=trainer.config, workdir=trainer.workdir, **trainer.report_faces())


def test_each_surrogate_uses_its_views_threshold_with_its_label(reported):
  trainer, report = reported
  on_view, fallback, peer, none = (report["surrogates"][s.spec] for s in trainer.surrogates)
  assert all(e["view"] == VIEW for e in (on_view, fallback, peer, none))
  assert (on_view["tau1"], on_view["tau2"]) == (0.4, 0.2)
  assert on_view["thresholds"]["tau1"]["label"] == f"calibrated on {VIEW}"
  assert (fallback["tau1"], fallback["tau2"]) == (0.5, 0.3)
  assert fallback["thresholds"]["tau1"]["kind"] == "arcface112 fallback"
  assert fallback["thresholds"]["tau2"]["label"] == f"arcface112 threshold, {VIEW} not calibrated"
  assert (peer["tau1"], peer["tau2"]) == (0.166788, 0.094632)
  assert peer["thresholds"]["tau1"]["label"] == "peer default, not calibrated here"
  assert none["tau1"] is None and none["thresholds"] == {"tau1": None, "tau2": None}
  assert not {"asr", "esr", "smr", "irr"} & set(none)
  for entry in (on_view, fallback, peer):
    cos = np.asarray(entry["cos"]["adv"])
    assert entry["asr"]["adv"] == pytest.approx(np.mean(cos > entry["tau1"]))
    assert entry["esr"]["rec"] == pytest.approx(np.mean(np.asarray(entry["cos"]["rec"]) < entry["tau2"]))


def test_report_text_names_each_thresholds_source(reported):
  _, report = reported
  text = report_lib.format_report(report)
  assert f"- tiny0 (view {VIEW}): tau1 0.4000 at FAR 0.01 (calibrated on {VIEW})" in text
  assert f"tau2 0.3000 at FAR 0.1 (arcface112 threshold, {VIEW} not calibrated)" in text
  assert "tau1 0.1668 at FAR 0.01 (peer default, not calibrated here)" in text
  assert "- tiny3 (view none@16): tau1 not calibrated (n/a); tau2 not calibrated (n/a)" in text
  assert "mean of the per-image cosines" in text


def test_cosine_to_several_targets_is_the_mean_of_per_image_cosines(reported):
  trainer, report = reported
  x = uint8_to_minus1_1(next(tiny.tiny_source(trainer.config, n=8))["image"])
  x_t = uint8_to_minus1_1(_target(trainer.config))
  for surrogate in trainer.surrogates:
    e = np.asarray(surrogate.embed(x), np.float64)
    per_image = e @ np.asarray(surrogate.embed(x_t), np.float64).T  # [N, 3]
    got = np.asarray(report["surrogates"][surrogate.spec]["cos"]["clean"])
    np.testing.assert_allclose(got, per_image.mean(axis=1), atol=1e-5)
    mean = np.asarray(surrogate.embed(x_t), np.float64).mean(0)
    assert np.abs(got - e @ (mean / np.linalg.norm(mean))).max() > 1e-3  # not the normalised mean's cosine


def test_unknown_threshold_source_is_refused_before_training(tmp_path):
  config = _config(**{"fr.threshold_source": "peers"})
  with pytest.raises(ConfigError, match="fr.threshold_source='peers'"):
    trainer_lib.Trainer(config, tmp_path, source=tiny.tiny_source(config, n=8), surrogates=_surrogates(),
                        target_images=_target(config))


def test_resuming_an_older_run_accepts_the_report_only_and_numerics_keys(tmp_path):
  """A run saved before `fr.threshold_source` existed resumes without --allow-config-change, and so does a change of
  which thresholds the report uses; a training change is still refused."""
  from erasablemask_jax.config import load_config
  from erasablemask_jax.train import resume

  saved = load_config("smoke").to_dict()
  del saved["fr"]["threshold_source"]
  del saved["fr"]["fold_batchnorm"]  # nor `fr.fold_batchnorm` (numerics only: the same networks)
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(saved))
  config = load_config("smoke", ["--config.fr.threshold_source=peer_default", "--config.fr.tau2_far=0.01"])
  changes = resume.check_resume_config(workdir, config)
  assert set(changes) == {"fr.threshold_source", "fr.tau2_far", "fr.fold_batchnorm"}
  with pytest.raises(resume.ConfigChangeError, match="loss.l_adv"):
    resume.check_resume_config(workdir, load_config("smoke", ["--config.loss.l_adv=1.0"]))
