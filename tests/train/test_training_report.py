"""The training run's closing white-box report: outputs scored as published (uint8, R restoring the rounded x_adv), and
ASR / ESR / SMR / IRR recomputed from the cosines it saves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from erasablemask_jax.fr import real_models
from erasablemask_jax.fr.surrogates import target_embeddings
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.train import report as report_lib
from erasablemask_jax.train import trainer as trainer_lib
from erasablemask_jax.image_io import to_uint8

THRESHOLDS = {"far_0.01": 0.5, "far_0.1": 0.3}


def _config():
  return tiny.tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3, "model.dis_layers": 3,
                             "data.batch_size": 4})


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
  """The report of an untrained tiny run (no held-out split: the first training batch), one calibrated surrogate."""
  config = _config()
  *surrogates, blackbox = tiny.tiny_surrogates(k=3, size=16)
  surrogates[0].recogniser.card["thresholds"] = dict(THRESHOLDS)
  blackbox.recogniser.card["thresholds"] = dict(THRESHOLDS)
  trainer = trainer_lib.Trainer(config, tmp_path_factory.mktemp("run"), source=tiny.tiny_source(config, n=8),
                                surrogates=surrogates, target_images=tiny.tiny_target(config))
  state = trainer.init_state()
  report = report_lib.whitebox_report(trainer.models, state, trainer.surrogates, trainer.targets,
                                      config=trainer.config, workdir=trainer.workdir, blackbox=[blackbox],
                                      blackbox_targets=target_embeddings([blackbox], uint8_to_minus1_1(
                                          trainer.target_images)),
                                      not_scored={"shared:absent": "not loaded: no such file"},
                                      **trainer.report_faces())
  return trainer, state, report


def _on_uint8_grid(x):
  np.testing.assert_array_equal(uint8_to_minus1_1(to_uint8(x)), x)


def test_published_outputs_are_rounded_and_restored_from_the_rounded_face(reported):
  trainer, state, _ = reported
  batch = next(tiny.tiny_source(trainer.config, n=8))
  x, att_a = uint8_to_minus1_1(batch["image"]), jnp.asarray(batch["att_a"], jnp.float32)
  att_b = jnp.roll(att_a, 1, axis=0)
  out = report_lib.published_outputs(trainer.models, state, x, att_a, att_b)
  for k in ("edit", "adv", "rec"):
    _on_uint8_grid(out[k])
  (x_adv, _), _ = jax.jit(trainer.models.protect)(state.g.variables, state.e_adv.variables, x, att_b)
  np.testing.assert_allclose(out["adv"], uint8_to_minus1_1(to_uint8(x_adv)), atol=1 / 127.5 + 1e-6)
  restore = jax.jit(lambda v, a, b: trainer.models.restore(v, a, b)[0])
  from_rounded = uint8_to_minus1_1(to_uint8(restore(state.r.variables, out["adv"], att_a)))
  np.testing.assert_array_equal(out["rec"], from_rounded)


def test_rates_recomputed_from_saved_cosines(reported):
  trainer, _, report = reported
  saved = json.loads((trainer.workdir / "report.json").read_text())
  assert saved == report
  calibrated, uncalibrated = (report["surrogates"][s.spec] for s in trainer.surrogates)
  tau1, tau2 = THRESHOLDS["far_0.01"], THRESHOLDS["far_0.1"]
  assert (calibrated["tau1"], calibrated["tau2"]) == (tau1, tau2)
  cos, src = ({k: np.asarray(v) for k, v in calibrated[name].items()} for name in ("cos", "cos_source"))
  assert sorted(src) == ["adv", "edit", "rec"] and all(len(v) == report["faces"] == 4 for v in src.values())
  assert calibrated["asr"] == {k: pytest.approx(np.mean(cos[k] > tau1)) for k in ("clean", "edit", "adv")}
  assert calibrated["esr"] == {k: pytest.approx(np.mean(cos[k] < tau2)) for k in ("adv", "rec")}
  assert calibrated["smr"] == {k: pytest.approx(np.mean(src[k] > tau1)) for k in ("edit", "adv")}
  assert calibrated["irr"] == {"rec": pytest.approx(np.mean(src["rec"] > tau1))}
  assert calibrated["mean_cos_source"] == {k: pytest.approx(v.mean()) for k, v in src.items()}
  # Uncalibrated: cosines (to the target and to the source) only, no rates.
  assert not {"asr", "esr", "smr", "irr"} & set(uncalibrated)
  assert sorted(uncalibrated["mean_cos_source"]) == ["adv", "edit", "rec"]


def test_cosines_to_the_source_are_those_of_the_published_faces(reported):
  trainer, state, report = reported
  batch = next(tiny.tiny_source(trainer.config, n=8))
  x, att_a = uint8_to_minus1_1(batch["image"]), jnp.asarray(batch["att_a"], jnp.float32)
  out = report_lib.published_outputs(trainer.models, state, x, att_a, jnp.roll(att_a, 1, axis=0))
  for surrogate, target in zip(trainer.surrogates, trainer.targets):
    entry = report["surrogates"][surrogate.spec]
    clean = np.asarray(surrogate.embed(x))
    np.testing.assert_allclose(entry["cos"]["clean"], clean @ np.asarray(target), atol=1e-5)  # the same faces
    for k in ("edit", "adv", "rec"):
      e = np.asarray(surrogate.embed(out[k]))
      np.testing.assert_allclose(entry["cos_source"][k], np.sum(e * clean, axis=1), atol=1e-5)
      np.testing.assert_allclose(entry["cos"][k], e @ np.asarray(target), atol=1e-5)


def test_format_report_has_the_source_columns(reported):
  _, _, report = reported
  text = report_lib.format_report(report)
  header = next(line for line in text.splitlines() if line.startswith("| model | role"))
  for column in ("src adv", "src rec", "SMR edit", "SMR adv", "IRR rec", "ASR adv", "ESR rec"):
    assert column in header, column
  rows = [line for line in text.splitlines() if line.startswith("| tiny")]
  assert len(rows) == 3 and all(row.count("|") == header.count("|") for row in rows)
  assert rows[1].count("n/a") == 7  # the uncalibrated surrogate has no rates
  assert rows[2].startswith("| tiny2 | black-box |") and "n/a" not in rows[2]
  assert "- shared:absent: not scored (not loaded: no such file)" in text
  assert any(line.startswith("- tiny2 (black box): protection moved") for line in text.splitlines())


def test_black_boxes_are_scored_like_surrogates_but_apart(reported):
  """The report's black boxes (`fr.report_models`) get the same entry as a surrogate, under `"blackbox"`, saved."""
  trainer, _, report = reported
  assert list(report["surrogates"]) == ["tiny0", "tiny1"] and list(report["blackbox"]) == ["tiny2"]
  entry = report["blackbox"]["tiny2"]
  assert set(entry) == set(report["surrogates"]["tiny0"])
  tau1 = THRESHOLDS["far_0.01"]
  assert entry["asr"]["adv"] == pytest.approx(np.mean(np.asarray(entry["cos"]["adv"]) > tau1))
  assert entry["irr"]["rec"] == pytest.approx(np.mean(np.asarray(entry["cos_source"]["rec"]) > tau1))
  saved = json.loads((trainer.workdir / "report.json").read_text())
  assert saved["blackbox"]["tiny2"]["cos"] == entry["cos"] and saved["not_scored"] == report["not_scored"]


def test_shared_star_expands_to_the_present_real_models_without_the_surrogates_networks(tmp_path, monkeypatch):
  """`shared:*` lists every real model whose asset is present; foamliu is the bundled network, so a run attacking
  `bundled:mobilefacenet` (either view) scores it as a surrogate only."""
  monkeypatch.setattr(real_models, "ASSETS_DIR", tmp_path)
  present = real_models.REAL_MODELS["faceres"].asset
  (tmp_path / present).parent.mkdir(parents=True)
  (tmp_path / present).write_text("{}")
  wanted, skipped = real_models.expand(("shared:*", "tiny/dir"), ["bundled:mobilefacenet@flip"])
  assert wanted == ["shared:faceres", "tiny/dir"]
  assert skipped["shared:foamliu"] == "already scored as a surrogate"
  assert set(skipped) == {f"shared:{n}" for n in real_models.REAL_MODELS if n != "faceres"}
  assert all(why.endswith("not found") for spec, why in skipped.items() if spec != "shared:foamliu")
  assert real_models.expand(("shared:*",), [])[0][0] == "shared:foamliu"  # bundled: always present
  assert real_models.expand(("tiny/dir", "tiny/dir@flip"), []) == (["tiny/dir"],
                                                                    {"tiny/dir@flip": "listed more than once"})


def _entry(clean, adv, irr=None):
  entry = {"mean_cos": {"clean": clean, "edit": clean, "adv": adv, "rec": clean}}
  if irr is not None:
    entry["irr"] = {"rec": irr}
  return entry


def test_verdict_says_plainly_when_the_authority_cannot_verify_the_restored_faces():
  report = {"surrogates": {"good": _entry(0.05, 0.40, irr=6 / 7), "bad": _entry(0.05, 0.01, irr=2 / 7),
                           "uncalibrated": _entry(0.05, 0.20)}}
  good, good_irr, bad, bad_irr, unc, unc_irr = report_lib.verdict(report)
  assert good == "- good: protection moved the cosine to the target by +0.350 (0.050 clean -> 0.400 protected), toward the target."
  assert good_irr == "- good: the restored faces verify as the person for 85.7% of faces (goal 80%)."
  assert bad.endswith("NOT toward the target.")
  assert bad_irr.startswith("- bad: IRR 28.6% is below the 80% goal: ") and "could NOT verify" in bad_irr
  assert "Transfer study" in bad_irr
  assert unc.endswith("toward the target.") and "IRR n/a" in unc_irr


@pytest.mark.assets
def test_load_report_models_loads_every_present_real_model(assets_dir):
  """The demo's `fr.report_models = ("shared:*",)`: five real models besides the bundled surrogate, each with its
  target embedding; a spec that cannot load is a reason in the report, not an error."""
  del assets_dir  # skips without ../shared/assets
  from erasablemask_jax.fr.surrogates import load_surrogate  # pylint: disable=g-import-not-at-top

  config = _config()
  config.unlock()
  config.fr.report_models = ("shared:*", "no/such/model")
  config.fr.input_crop = "loose_to_arcface"
  surrogates = [load_surrogate("bundled:mobilefacenet", "loose_to_arcface", 16)]
  faces = np.asarray(tiny.tiny_target(config))
  models, targets, skipped = report_lib.load_report_models(config, surrogates, faces)
  assert [m.spec for m in models] == [f"shared:{n}" for n in ("xiaoccer", "mobileface_v2", "faceres", "faceres_deep",
                                                                "mobileface_v3")]
  assert [t.shape for t in targets] == [(128,), (256,), (1024,), (1024,), (256,)]
  assert all(m.view == "loose_to_arcface@16" for m in models)
  assert skipped["shared:foamliu"] == "already scored as a surrogate"
  assert skipped["no/such/model"].startswith("not loaded: FR model 'no/such/model'") and len(skipped) == 2
