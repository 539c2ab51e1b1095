"""The training run's closing white-box report: outputs scored as published (uint8, R restoring the rounded x_adv), and
ASR / ESR / SMR / IRR recomputed from the cosines it saves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
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
  surrogates = tiny.tiny_surrogates(k=2, size=16)
  surrogates[0].recogniser.card["thresholds"] = dict(THRESHOLDS)
  trainer = trainer_lib.Trainer(config, tmp_path_factory.mktemp("run"), source=tiny.tiny_source(config, n=8),
                                surrogates=surrogates, target_images=tiny.tiny_target(config))
  state = trainer.init_state()
  report = report_lib.whitebox_report(trainer.models, state, trainer.surrogates, trainer.targets,
                                      config=trainer.config, workdir=trainer.workdir, **trainer.report_faces())
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
  header = next(line for line in text.splitlines() if line.startswith("| surrogate"))
  for column in ("src adv", "src rec", "SMR edit", "SMR adv", "IRR rec", "ASR adv", "ESR rec"):
    assert column in header, column
  rows = [line for line in text.splitlines() if line.startswith("| tiny")]
  assert len(rows) == 2 and all(row.count("|") == header.count("|") for row in rows)
  assert rows[1].count("n/a") == 7  # the uncalibrated surrogate has no rates


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
