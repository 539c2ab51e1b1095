"""`erasablemask evaluate` on the bundled sample faces: numbers recomputed from the saved embeddings, faces scored as
published (uint8), determinism, white-box / black-box marking, missing thresholds and metric weights, `--remote` through
a real local server; sweep."""

import json
import shutil

import numpy as np
import pytest

from erasablemask_jax import cli
from erasablemask_jax import fr
from erasablemask_jax.evaluation import render
from erasablemask_jax.evaluation import report as report_lib
from erasablemask_jax.evaluation import sweep as sweep_lib
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import compare_server
from erasablemask_jax.metrics import lpips

TRANSFORMS = "jpeg50,gauss0.003,rotate30,crop224"
COMMON = ["--data", "bundled:sample_faces", "--identities", "2,3,4", "--max-faces", "5", "--transforms", TRANSFORMS,
          "--pgd-steps", "3", "--seed", "7"]


@pytest.fixture(scope="module")
def uncalibrated_copy(tmp_path_factory):
  """The bundled MobileFaceNet copied to another directory with its thresholds removed (a black-box model)."""
  dest = tmp_path_factory.mktemp("fr") / "mfn_uncalibrated"
  shutil.copytree(fr.bundled_dir(), dest)
  card = json.loads((dest / "card.json").read_text())
  del card["thresholds"], card["thresholds_by_view"]  # every view's
  card["name"] = "mfn_uncalibrated"
  (dest / "card.json").write_text(json.dumps(card))
  return dest


@pytest.fixture(scope="module")
def remote_url():
  recogniser = fr.load_bundled()
  server = compare_server.make_server(recogniser.embed, input_size=(32, 32))  # the tiny run's faces, unresized
  thread = compare_server.start_in_thread(server)
  host, port = server.server_address[:2]
  yield f"http://{host}:{port}/compare"
  server.shutdown()
  server.server_close()
  thread.join(5)


@pytest.fixture(scope="module")
def first(tiny_run, uncalibrated_copy, remote_url, tmp_path_factory):
  out = tmp_path_factory.mktemp("report1")
  rc = cli.main(["evaluate", "--workdir", str(tiny_run), "--fr", "bundled:mobilefacenet", "--blackbox",
                 str(uncalibrated_copy), "--out", str(out), "--remote", remote_url, "--remote-rate", "0", *COMMON])
  assert rc == 0
  return out


def test_report_files_and_layout(first):
  report = json.loads((first / "report.json").read_text())
  for name in ("report.md", "fig4.png", "table2_asr.png", "table2_source.png", "table5_robustness.png",
               "table5_source.png",
               "embeddings/mobilefacenet_foamliu.npz", "embeddings/mfn_uncalibrated.npz"):
    assert (first / name).is_file(), name
  assert report["models"]["mobilefacenet_foamliu"]["whitebox"] is True
  assert report["models"]["mfn_uncalibrated"]["whitebox"] is False
  assert len(report["faces"]) == 5 and report["target"] == "identity:0"
  assert not any(f.startswith("deepface_img8") or f.startswith("deepface_img9") for f in report["faces"])
  md = (first / "report.md").read_text()
  assert "mobilefacenet_foamliu (W)" in md and "mfn_uncalibrated (B)" in md
  for row in ("Attribute edit SMR", "FGSM SMR", "PGD SMR", "ErasableMask SMR", "ErasableMask IRR"):
    assert f"| {row} |" in md, row
  assert "ASR / ESR / SMR / IRR" in md
  # No LPIPS / FID weights given: LPIPS is the `metrics` extra's when installed, and says what to install otherwise;
  # FID says it has no weights, never a number.
  installed = not isinstance(lpips.load_lpips("alex", None), availability.Unavailable)
  for row in report["table6"].values():
    assert isinstance(row["lpips"], float) if installed else "erasablemask-jax[metrics]" in row["lpips"]["unavailable"]
    assert "unavailable" in row["fid"]
    assert isinstance(row["l1"], float) and isinstance(row["mse"], float)
  assert md.count("not available (no LPIPS") == (0 if installed else 2) and md.count("not available (no FID") == 2
  # crop224 does not fit 32x32 faces: reported unavailable with the reason.
  assert "does not fit" in report["table5"]["mobilefacenet_foamliu"]["crop224"]["asr"]["unavailable"]
  # An uncalibrated model gets cosines, not rates.
  uncalibrated = report["table2"]["mfn_uncalibrated"]
  for key in ("asr", "esr", "smr", "irr"):
    assert "unavailable" in uncalibrated["erasablemask"][key], key
  assert "unavailable" in uncalibrated["pgd"]["smr"]
  assert isinstance(uncalibrated["erasablemask"]["mean_cos"], float)
  assert isinstance(uncalibrated["erasablemask"]["mean_cos_restored_source"], float)
  assert "unavailable" in report["table5"]["mfn_uncalibrated"]["jpeg50"]["irr"]
  # The clean face is its own source: no SMR.
  assert "smr" not in report["table2"]["mobilefacenet_foamliu"]["clean"]


def test_rates_recomputed_from_saved_embeddings(first):
  report = json.loads((first / "report.json").read_text())
  data = np.load(first / "embeddings" / "mobilefacenet_foamliu.npz")
  tau1, tau2 = float(data["tau1"]), float(data["tau2"])
  card = fr.load_bundled().card["thresholds"]
  assert tau1 == pytest.approx(card["far_0.01"]) and tau2 == pytest.approx(card["far_0.1"])
  target = data["target"].astype(np.float64)
  assert target.shape[0] == 2  # identity 0 has two photos
  t = target.mean(axis=0)

  def cos(key):
    e = data[key].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    return e @ t

  t2 = report["table2"]["mobilefacenet_foamliu"]
  for method, key in (("clean", "clean"), ("edit", "edit"), ("fgsm", "fgsm"), ("pgd", "pgd"),
                      ("erasablemask", "adv")):
    assert t2[method]["asr"] == pytest.approx(np.mean(cos(key) > tau1)), method
    assert t2[method]["mean_cos"] == pytest.approx(np.mean(cos(key)), abs=1e-6), method
  assert t2["erasablemask"]["esr"] == pytest.approx(np.mean(cos("rec") < tau2))

  def src(key):  # each face against its own clean source
    return np.sum(data[key].astype(np.float64) * data["clean"].astype(np.float64), axis=1)

  for method, key in (("edit", "edit"), ("fgsm", "fgsm"), ("pgd", "pgd"), ("erasablemask", "adv")):
    assert t2[method]["smr"] == pytest.approx(np.mean(src(key) > tau1)), method
    assert t2[method]["mean_cos_source"] == pytest.approx(np.mean(src(key)), abs=1e-6), method
  assert t2["erasablemask"]["irr"] == pytest.approx(np.mean(src("rec") > tau1))
  assert t2["erasablemask"]["mean_cos_restored_source"] == pytest.approx(np.mean(src("rec")), abs=1e-6)
  assert t2["erasablemask"]["mean_cos_restored_source"] < 1.0
  t5 = report["table5"]["mobilefacenet_foamliu"]
  assert t5["none"] == {k: t2["erasablemask"][k] for k in ("asr", "esr", "smr", "irr")}
  for name in ("jpeg50", "gauss0.003", "rotate30"):
    assert t5[name]["asr"] == pytest.approx(np.mean(cos(f"{name}.adv") > tau1))
    assert t5[name]["esr"] == pytest.approx(np.mean(cos(f"{name}.rec") < tau2))
    assert t5[name]["smr"] == pytest.approx(np.mean(src(f"{name}.adv") > tau1))
    assert t5[name]["irr"] == pytest.approx(np.mean(src(f"{name}.rec") > tau1))
  # White-box PGD against the run's surrogate beats the clean faces even with 3 steps at 32x32.
  assert np.mean(cos("pgd")) > np.mean(cos("clean")) + 0.1


def test_clean_embeddings_are_the_models_own(first, loaded_run):
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  from erasablemask_jax.fr.surrogates import load_surrogate
  report = json.loads((first / "report.json").read_text())
  arrays = load_face_folder_arrays("bundled:sample_faces", loaded_run.image_size)
  index = [arrays["file"].index(f) for f in report["faces"]]
  surrogate = load_surrogate("bundled:mobilefacenet", "loose_to_arcface", loaded_run.image_size)
  expected = np.asarray(surrogate.embed(arrays["image"][index].astype(np.float32) / 127.5 - 1.0))
  saved = np.load(first / "embeddings" / "mobilefacenet_foamliu.npz")["clean"]
  np.testing.assert_allclose(saved, expected, atol=1e-5)


def test_faces_are_scored_as_published_uint8(first, loaded_run):
  """x_adv is rounded to uint8 before FR and R; x_rec = round(R(round(x_adv))), as `protect` then `erase` would."""
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  from erasablemask_jax.inference import attributes as attributes_lib
  from erasablemask_jax.fr.surrogates import load_surrogate
  from erasablemask_jax.image_io import to_uint8
  report = json.loads((first / "report.json").read_text())
  assert report["att_a_source"] == "attributes.csv"
  arrays = load_face_folder_arrays("bundled:sample_faces", loaded_run.image_size)
  index = [arrays["file"].index(f) for f in report["faces"]]
  x = arrays["image"][index].astype(np.float32) / 127.5 - 1.0
  att_a = arrays["att"][index].astype(np.float32)
  x_adv_float, _ = loaded_run.protect(x, attributes_lib.parse_spec(report["attrs"]).apply(att_a))
  x_adv = to_uint8(x_adv_float).astype(np.float32) / 127.5 - 1.0
  x_rec = to_uint8(loaded_run.restore(x_adv, att_a)).astype(np.float32) / 127.5 - 1.0
  published = report_lib.protect_and_restore(loaded_run, x, att_a,
                                             attributes_lib.parse_spec(report["attrs"]).apply(att_a))
  np.testing.assert_array_equal(published["adv"], x_adv)
  np.testing.assert_array_equal(published["rec"], x_rec)
  for k in ("edit", "adv", "rec"):  # on the uint8 grid
    np.testing.assert_array_equal(to_uint8(published[k]).astype(np.float32) / 127.5 - 1.0, published[k])
  surrogate = load_surrogate("bundled:mobilefacenet", "loose_to_arcface", loaded_run.image_size)
  saved = np.load(first / "embeddings" / "mobilefacenet_foamliu.npz")
  np.testing.assert_allclose(saved["adv"], np.asarray(surrogate.embed(x_adv)), atol=1e-5)
  np.testing.assert_allclose(saved["rec"], np.asarray(surrogate.embed(x_rec)), atol=1e-5)
  # The rounding is visible to the FR model (so the checks above tell rounded from unrounded inputs).
  assert np.max(np.abs(saved["adv"] - np.asarray(surrogate.embed(x_adv_float)))) > 1e-4


def test_table5_scores_the_transformed_faces_rounded_to_uint8(loaded_run):
  """Table V, like Table II, scores published images: T(x_adv) rounded to uint8, and R(that) rounded."""
  import jax
  from erasablemask_jax import noise
  from erasablemask_jax.image_io import to_uint8
  transforms = ["gauss0.003", "rotate30"]  # both leave the uint8 grid (JPEG decodes onto it)
  models = report_lib.load_eval_models(["bundled:mobilefacenet"], [], loaded_run.config)
  tables = report_lib.compute_tables(loaded_run, "bundled:sample_faces", models, transforms=transforms, seed=7,
                                     identities=[2, 3, 4], max_faces=3, pgd_steps=1)
  emb, images = tables["embeddings"][models[0].key], tables["images"]
  att_a = _att_a(tables["report"], loaded_run)
  embed = models[0].surrogate.embed
  for i, name in enumerate(transforms):
    transformed = np.asarray(noise.get_eval_transform(name)(jax.numpy.asarray(images["adv"]),
                                                            jax.random.fold_in(jax.random.PRNGKey(7), i)))
    rounded = to_uint8(transformed).astype(np.float32) / 127.5 - 1.0
    restored = to_uint8(loaded_run.restore(rounded, att_a)).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(emb[f"{name}.adv"], np.asarray(embed(rounded)), atol=1e-5)
    np.testing.assert_allclose(emb[f"{name}.rec"], np.asarray(embed(restored)), atol=1e-5)
    assert np.max(np.abs(emb[f"{name}.adv"] - np.asarray(embed(transformed)))) > 1e-4, name


def _att_a(report, loaded_run):
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  arrays = load_face_folder_arrays("bundled:sample_faces", loaded_run.image_size)
  return arrays["att"][[arrays["file"].index(f) for f in report["faces"]]].astype(np.float32)


def test_remote_scores_match_the_server_model(first):
  report = json.loads((first / "report.json").read_text())
  remote = report["remote"]
  assert remote["requests"] == 3 * len(report["faces"])
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  arrays = load_face_folder_arrays("bundled:sample_faces", report["image_size"])
  recogniser = fr.load_bundled()
  target = arrays["image"][arrays["identity"] == 0][0]
  expected = [compare_server.pair_confidence(recogniser.embed, arrays["image"][arrays["file"].index(f)], target)
              for f in report["faces"]]
  np.testing.assert_allclose(remote["clean"]["confidence"], expected, atol=1e-5)
  assert len(remote["adv"]["confidence"]) == len(remote["rec"]["confidence"]) == len(report["faces"])


def _numbers(report):
  return {k: report[k] for k in ("table2", "table5", "table6", "faces", "models")}


def test_second_run_gives_identical_numbers(first, loaded_run, uncalibrated_copy, tmp_path):
  """Through the two halves of `evaluate`: `compute_tables` writes nothing, `render.write_report` writes the folder."""
  models = report_lib.load_eval_models(["bundled:mobilefacenet"], [str(uncalibrated_copy)], loaded_run.config)
  tables = report_lib.compute_tables(loaded_run, "bundled:sample_faces", models, transforms=TRANSFORMS.split(","),
                                     seed=7, identities=[2, 3, 4], max_faces=5, pgd_steps=3)
  assert not list(tmp_path.iterdir())
  render.write_report(tmp_path, tables)
  second = tables["report"]
  assert _numbers(json.loads((tmp_path / "report.json").read_text())) == _numbers(second)
  assert _numbers(second) == _numbers(json.loads((first / "report.json").read_text()))
  for name in ("mobilefacenet_foamliu", "mfn_uncalibrated"):
    a, b = np.load(first / "embeddings" / f"{name}.npz"), np.load(tmp_path / "embeddings" / f"{name}.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])


def test_evaluate_bad_inputs(tiny_run, tmp_path, capsys):
  rc = cli.main(["evaluate", "--workdir", str(tiny_run), "--fr", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                 *COMMON])
  assert rc == 1 and "no converted FR directory" in capsys.readouterr().err
  rc = cli.main(["evaluate", "--workdir", str(tiny_run), "--fr", "bundled:mobilefacenet", "--out",
                 str(tmp_path / "r"), "--target", "identity:42", *COMMON])
  assert rc == 1 and "no face of identity 42" in capsys.readouterr().err


def test_sweep_plots_from_evaluated_runs(first, tiny_run, tmp_path, capsys):
  runs = []
  for gamma in (0.1, 0.0, 0.05):
    run = tmp_path / f"run_gamma{gamma}"
    (run / "evaluation").mkdir(parents=True)
    config = json.loads((tiny_run / "config.json").read_text())
    config["model"]["gamma"] = gamma
    (run / "config.json").write_text(json.dumps(config))
    shutil.copy(first / "report.json", run / "evaluation" / "report.json")
    runs.append(str(run))
  out = tmp_path / "sweep"
  assert cli.main(["sweep", "--param", "gamma", "--runs", ",".join(runs), "--out", str(out)]) == 0
  result = json.loads((out / "sweep.json").read_text())
  assert [r["gamma"] for r in result["runs"]] == [0.1, 0.0, 0.05]
  report = json.loads((first / "report.json").read_text())
  asr = report["table2"]["mobilefacenet_foamliu"]["erasablemask"]["asr"]
  assert result["runs"][0]["asr"]["mobilefacenet_foamliu"] == asr
  assert result["runs"][0]["mean_asr"] == asr  # the uncalibrated model has no rate and is left out of the mean
  for k in ("smr", "irr"):
    rate = report["table2"]["mobilefacenet_foamliu"]["erasablemask"][k]
    assert result["runs"][0][k] == {"mobilefacenet_foamliu": rate, "mfn_uncalibrated": None}
    assert result["runs"][0][f"mean_{k}"] == rate
  for name in ("sweep_asr_esr.png", "sweep_smr_irr.png", "sweep_quality.png"):
    assert (out / name).is_file(), name
  md = (out / "sweep.md").read_text().splitlines()
  assert [line.split("|")[1].strip() for line in md[4:7]] == ["0", "0.05", "0.1"]
  assert "mean SMR | mean IRR" in md[2]
  # A run without a report is a clear error.
  with pytest.raises(FileNotFoundError, match="erasablemask evaluate"):
    sweep_lib.sweep("gamma", [runs[0], str(tiny_run)], tmp_path / "s2")
  assert cli.main(["sweep", "--param", "gamma", "--runs", runs[0], "--out", str(tmp_path / "s3")]) == 1
  assert "at least 2 runs" in capsys.readouterr().err
