"""benchmarks/transfer_study.py end to end on tiny settings: the JSON it writes, its rates, and that a rerun resumes.

The tiny study aligns 32 real CelebA photos (8 identities), converts the six real FR models (three formats), calibrates
their views, trains stage 1 once and stages 2-3 for two attack kinds on the MobileFace V3 black-box fold (three
surrogates), two steps a stage, and the `with_id` variant's stage 3 from the meta-auxiliary run's stage 2.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from benchmarks import transfer_study

pytestmark = [pytest.mark.assets, pytest.mark.slow]
RATES = ("asr", "esr", "irr", "smr")


@pytest.fixture(scope="module")
def study(tmp_path_factory, assets_dir):
  del assets_dir  # skips without ../shared/assets
  work = tmp_path_factory.mktemp("study")
  args = ["--tiny", "--folds", "mobileface_v3", "--kinds", "meta_auxiliary,ensemble", "--variants", "study,with_id",
          "--workdir", str(work), "--out", str(work / "study.json")]
  assert transfer_study.main(args) == 0
  return work, args, json.loads((work / "study.json").read_text())


SURROGATES = ["foamliu", "xiaoccer", "mobileface_v2"]
BLACKBOX = ["mobileface_v3", "faceres", "faceres_deep"]


def test_json_layout_and_rates(study):
  work, _, result = study
  runs = {(r["attack"], r["variant"]): r for r in result["runs"]}
  assert set(runs) == {("clean", None), ("edit", None), ("fgsm", None), ("pgd", None), ("meta_auxiliary", "study"),
                       ("ensemble", "study"), ("meta_auxiliary", "with_id")}
  assert set(result["calibration"]) == set(SURROGATES + BLACKBOX)
  for name, cal in result["calibration"].items():
    assert 0.5 < cal["auc"] <= 1.0, name
    assert cal["thresholds"]["far_0.1"] < cal["thresholds"]["far_0.01"]
  for key in (("meta_auxiliary", "study"), ("ensemble", "study"), ("meta_auxiliary", "with_id")):
    r = runs[key]
    assert r["fold"] == "mobileface_v3" and r["surrogates"] == SURROGATES and r["blackbox"] == BLACKBOX
    for model, m in r["metrics"].items():
      assert m["whitebox"] == (model in SURROGATES)
      for k in RATES:
        assert 0.0 <= m[k] <= 1.0 and 0.0 <= m["jpeg50"][k] <= 1.0
      lo, hi = m["cos_adv_ci95"]
      assert lo <= m["cos_adv_mean"] <= hi
      # The rates are what the saved per-face cosines and the view's thresholds say.
      assert m["asr"] == pytest.approx(np.mean(np.asarray(m["cos_adv"]) > m["tau1"]), abs=1e-9)
      assert m["irr"] == pytest.approx(np.mean(np.asarray(m["cos_rec_source"]) > m["tau1"]), abs=1e-9)
      assert m["esr"] == pytest.approx(np.mean(np.asarray(m["cos_rec"]) < m["tau2"]), abs=1e-9)
      assert m["smr"] == pytest.approx(np.mean(np.asarray(m["cos_adv_source"]) > m["tau1"]), abs=1e-9)
      d = r["diagnosis"][model]
      assert d["cos_rec_source"] == pytest.approx(m["cos_rec_source_mean"], abs=1e-5)
      assert d["esr_lost"] == [int(i) for i in np.flatnonzero(np.asarray(m["cos_rec"]) >= m["tau2"])]
      assert -1.0 <= d["cos_rec_clean_source"] <= 1.0 and -1.0 <= d["cos_down64_source"] <= 1.0
    assert set(r["quality"]) == {"adv_vs_edit", "rec_vs_cov"}
    assert r["curve"], "the run's loss curve is kept"
    assert (work / r["faces"]).is_file()
  # `with_id` continues the meta-auxiliary run's stage 2: the same protected faces, a stage 3 with L_id.
  assert runs["meta_auxiliary", "with_id"]["metrics"]["faceres"]["cos_adv"] == pytest.approx(
      runs["meta_auxiliary", "study"]["metrics"]["faceres"]["cos_adv"], abs=1e-6)
  stage3 = lambda r: [c for c in r["curve"] if c.get("stage") == 3]
  assert stage3(runs["meta_auxiliary", "with_id"]) and all("r/id" in c for c in stage3(runs["meta_auxiliary", "with_id"]))
  assert stage3(runs["meta_auxiliary", "study"]) and not any("r/id" in c for c in stage3(runs["meta_auxiliary", "study"]))
  assert result["variants"]["with_id"]["stage3"] == ["loss.l_era_id=10.0"]
  # The clean face is its own source: SMR 1 at any threshold below 1; FGSM/PGD have no restorer.
  assert all(m["smr"] == 1.0 and m["irr"] is None for m in runs["clean", None]["metrics"].values())
  assert all(m["irr"] is None for m in runs["pgd", None]["metrics"].values())
  assert (work / "study.png").is_file()
  # meta_auxiliary against the ensemble, face by face, on every model.
  paired = result["paired_difference_meta_auxiliary"]["bb-mobileface_v3"]
  assert set(paired) == {f"{m}_vs_ensemble" for m in result["calibration"]}
  for model in result["calibration"]:
    d = np.asarray(runs["meta_auxiliary", "study"]["metrics"][model]["cos_adv"]) - np.asarray(
        runs["ensemble", "study"]["metrics"][model]["cos_adv"])
    p = paired[f"{model}_vs_ensemble"]
    assert p["mean"] == pytest.approx(d.mean(), abs=1e-9) and p["n"] == d.size
    assert p["ci95"][0] <= p["mean"] <= p["ci95"][1] and p["faces_meta_higher"] == int((d > 0).sum())
  t = result["targets"]["mobileface_v3"]
  assert t["esr_min_all_models"]["met"] == (t["esr_min_all_models"]["value"] >= 0.9)
  # Beside the ESR target, the untouched faces' ESR (what an exact restorer scores) and the worst gap to it.
  clean = runs["clean", None]["metrics"]
  ceiling = {m: float(np.mean(np.asarray(v["cos_adv"]) < v["tau2"])) for m, v in clean.items()}
  assert t["esr_min_all_models"]["clean_faces"] == pytest.approx(min(ceiling.values()))
  meta = runs["meta_auxiliary", "study"]["metrics"]
  assert t["esr_min_all_models"]["worst_gap_to_clean"] == pytest.approx(max(ceiling[m] - meta[m]["esr"] for m in meta))


def test_diagnose_prints_every_run_and_model(study, capsys):
  work, args, result = study
  assert transfer_study.main(["--diagnose", "--out", str(work / "study.json")]) == 0
  table = capsys.readouterr().out
  assert sum(line.startswith("| mobileface_v3 |") for line in table.splitlines()) == 3 * 6
  assert transfer_study.main(["--tables", "--out", str(work / "study.json")]) == 0
  tables = capsys.readouterr().out.splitlines()
  trained = [r for r in result["runs"] if r["variant"]]
  assert sum(line.startswith(("| meta_auxiliary, ", "| ensemble, ")) for line in tables) == len(trained) == 3
  assert any(line.startswith("| clean faces' ESR | ") for line in tables)
  assert sum(line.startswith("| mobileface_v3 | ") for line in tables) == 1  # its row against the targets


def test_target_scan_gives_the_clean_rows_esr_for_the_study_target_and_ranks_every_candidate(study, capsys):
  from benchmarks import study_report  # pylint: disable=g-import-not-at-top

  work, args, result = study
  scan_path = work / "target_scan.json"
  written = (work / "study.json").stat().st_mtime_ns
  assert transfer_study.main(args + ["--target-scan", str(scan_path)]) == 0
  assert "<- the study's target" in capsys.readouterr().out
  scan = json.loads(scan_path.read_text())
  assert scan["study_target"] == result["settings"]["target_identity"]
  assert scan["eval_identities"] == result["settings"]["eval_identities"]
  (mine,) = [r for r in scan["rows"] if r["study_target"]]
  # The ceiling the scan predicts before training is what the study's clean row measured.
  assert mine["esr"] == pytest.approx(study_report.clean_esr(result, "mobileface_v3"))
  mins = [r["min_esr"] for r in scan["rows"]]
  assert mins == sorted(mins, reverse=True) and all(r["identity"] not in scan["eval_identities"] for r in scan["rows"])
  assert scan["candidates_meeting_esr_target"] == [r["identity"] for r in scan["rows"] if r["min_esr"] >= 0.9]
  assert (work / "study.json").stat().st_mtime_ns == written  # the study's JSON is only read


def test_unknown_fold_or_variant_is_one_line(study, capsys):
  _, args, _ = study
  assert transfer_study.main(args + ["--folds", "nonsense"]) == 2
  assert transfer_study.main(args + ["--variants", "nonsense"]) == 2
  err = capsys.readouterr().err
  assert "unknown fold ['nonsense']" in err and "unknown variant ['nonsense']" in err


def test_rerun_skips_finished_runs(study, monkeypatch):
  work, args, before = study

  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(transfer_study, "train", no_training)
  assert transfer_study.main(args) == 0
  after = json.loads((work / "study.json").read_text())
  assert [r["attack"] for r in after["runs"]] == [r["attack"] for r in before["runs"]]


def test_other_settings_refused(study, capsys):
  _, args, result = study
  assert result["settings"]["study"]["schedule"] == {"stage1_steps": 2, "stage2_steps": 2, "stage3_steps": 2}
  assert transfer_study.main(args + ["--eval-identities", "2"]) == 2
  assert "other settings" in capsys.readouterr().err
  # The same flags under another schedule (a changed config file, or an override) are another study too.
  assert transfer_study.main(args + ["--override", "schedule.stage3_steps=3"]) == 2
  assert "other settings" in capsys.readouterr().err


def test_a_variant_trained_under_other_overrides_is_refused_a_reworded_one_is_not(study, monkeypatch, capsys):
  _, args, _ = study
  with_id = transfer_study.VARIANTS["with_id"]

  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(transfer_study, "train", no_training)
  monkeypatch.setitem(transfer_study.VARIANTS, "with_id", dataclasses.replace(with_id, what="reworded"))
  assert transfer_study.main(args) == 0
  monkeypatch.setitem(transfer_study.VARIANTS, "with_id", dataclasses.replace(with_id, stage3=("loss.l_era_id=11.0",)))
  assert transfer_study.main(args) == 2
  assert "holds variants ['with_id'] trained with other overrides" in capsys.readouterr().err


def test_score_run_scores_a_trained_run_with_every_real_model(study):
  """benchmarks/score_run.py on the tiny meta-auxiliary run: the run's own held-out faces and target, each real model
  calibrated on the run's view (the same thresholds the study found), the rates what the per-face cosines say."""
  from benchmarks import score_run

  work, _, result = study
  out = work / "scored.json"
  run = work / "meta_auxiliary_study_bb-mobileface_v3_tiny"
  assert score_run.main([str(run), "--cache", str(work), "--max-identities", "8", "--bootstrap", "50",
                         "--out", str(out)]) == 0
  scored = json.loads(out.read_text())
  assert scored["whitebox"] == SURROGATES and scored["faces"] > 0
  assert scored["calibration"] == result["calibration"]
  study_run = next(r for r in result["runs"] if r["attack"] == "meta_auxiliary" and r["variant"] == "study")
  for model, m in scored["metrics"].items():
    assert m["whitebox"] == (model in SURROGATES)
    assert m["irr"] == pytest.approx(np.mean(np.asarray(m["cos_rec_source"]) > m["tau1"]), abs=1e-9)
    assert m["asr"] == pytest.approx(np.mean(np.asarray(m["cos_adv"]) > m["tau1"]), abs=1e-9)
    # The same run, faces and thresholds as the study's own evaluation of it.
    assert m["cos_adv"] == pytest.approx(study_run["metrics"][model]["cos_adv"], abs=1e-4)
  clean = next(r for r in result["runs"] if r["attack"] == "clean")
  for model, c in scored["clean"].items():  # the unprotected faces, as the study's clean baseline scored them
    assert c["cos_target_mean"] == pytest.approx(clean["metrics"][model]["cos_adv_mean"], abs=1e-4)
    assert c["asr"] == clean["metrics"][model]["asr"]


def test_score_run_refuses_a_folder_that_is_not_a_run(study, capsys):
  from benchmarks import score_run

  work, _, _ = study
  assert score_run.main([str(work / "models"), "--cache", str(work), "--out", str(work / "x.json")]) == 2
  assert "not a training run" in capsys.readouterr().err and not (work / "x.json").exists()


def test_second_order_study_measures_the_hessian_term_against_the_inner_step(study):
  """benchmarks/second_order_study.py on the tiny study's meta-auxiliary stage 2 (K = 3), measured with its first two
  surrogates (`--ks 2`; the run's own K compiles the same programs with a third real network, minutes more in CI)."""
  from benchmarks import second_order_study

  work, _, _ = study
  out = work / "second_order.json"
  run = work / "stage2_meta_auxiliary_study_bb-mobileface_v3_tiny"
  assert second_order_study.main([str(run), "--multiples", "1,1000", "--batch-size", "2", "--ks", "2",
                                  "--out", str(out)]) == 0
  rows = {(r["k"], r["lr_inner_over_lr"]): r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {(2, 1.0), (2, 1000.0)}
  assert second_order_study.main([str(run), "--ks", "4", "--out", str(work / "x.json")]) == 2  # more than the run has
  for k in (2,):
    small, big = rows[k, 1.0], rows[k, 1000.0]
    assert big["inner_step"] == pytest.approx(1000 * small["inner_step"], rel=1e-4)  # SGD: proportional to lr_inner
    assert big["hessian_share"] > small["hessian_share"] >= 0.0  # the second-order term grows with the inner step
    assert -1.0 <= big["cos_meta_first_order"] <= 1.0 + 1e-6 and -1.0 <= big["cos_meta_ensemble"] <= 1.0 + 1e-6
  assert second_order_study.main([str(work / "nothing"), "--out", str(work / "x.json")]) == 2
