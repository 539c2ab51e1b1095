"""The pure helpers of the benchmark scripts: exponent fits, profile self times, the run_all goal table."""

from __future__ import annotations

import json
import pathlib
import types

import numpy as np
import pytest

from benchmarks import cost_sweep
from benchmarks import pod_compile
from benchmarks import profile_summary
from benchmarks import results
from benchmarks import run_all


def test_cost_sweep_fits_recover_exponents():
  points = [{"image_size": s, "width": w, "batch": b, "median_s": 0.01 * s**2 * w**1.5 * b, "flops": 3.0 * s**2 * b}
            for s in (64, 128, 256) for w in (16, 32, 64) for b in (1, 4, 16)]
  line = [p for p in points if p["width"] == 16 and p["batch"] == 4]
  assert cost_sweep.fit_axis(line, "image_size", "median_s") == pytest.approx(2.0)
  joint = cost_sweep.fit_joint(points, "median_s")
  np.testing.assert_allclose([joint[a] for a in cost_sweep.AXES], [2.0, 1.5, 1.0], atol=1e-9)
  assert cost_sweep.fit_joint(points, "flops")["width"] == pytest.approx(0.0, abs=1e-9)


def test_profile_self_times_subtract_nested_events_per_thread():
  events = [
      {"ph": "X", "name": "step", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
      {"ph": "X", "name": "fusion.3", "ts": 10, "dur": 30, "pid": 1, "tid": 1},
      {"ph": "X", "name": "fusion.17", "ts": 50, "dur": 20, "pid": 1, "tid": 1},
      {"ph": "X", "name": "convolution.2", "ts": 55, "dur": 5, "pid": 1, "tid": 1},
      {"ph": "X", "name": "convolution", "ts": 0, "dur": 40, "pid": 1, "tid": 2},  # another thread: not nested
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1},
  ]
  totals = profile_summary._self_times(events, keep_suffix=False)  # pylint: disable=protected-access
  assert totals == {"step": 50.0, "fusion": 45.0, "convolution": 45.0}
  rows = profile_summary.summarise(totals, steps=1, wall_s=1e-4, top=2)
  assert [r["op"] for r in rows] == ["step", "fusion"] and rows[0]["busy_share"] == pytest.approx(50 / 140)


def test_run_all_goals_read_the_reports():
  report = {"torch": [{"kind": "ensemble", "torch_best_over_jax": 0.5},
                      {"kind": "meta_auxiliary", "torch_best_over_jax": 1.4, "torch_over_jax": 2.0}],
            "ratios": {"second_over_first_order": {"time_ratio": 1.6}}}
  goals = {g.what: g for g in run_all.GOALS if g.bench == "step_cpu128"}
  best = next(g for w, g in goals.items() if "best torch" in w)
  order = next(g for w, g in goals.items() if "first order" in w)
  assert best.check(report) == (1.4, "holds")
  assert order.check(report) == (1.6, "FAILS")
  assert best.check(None) == (None, "not measured") and best.check({"torch": []}) == (None, "not measured")
  assert {b.name for b in run_all.BENCHES} >= {g.bench for g in run_all.GOALS}


# The scripts' helpers, not benchmarks themselves.
# Modules the scripts import (no command of their own).
HELPERS = {"__init__", "results", "timing", "tiny_fr", "torch_nets", "run_all", "step_setup", "torch_attgan",
           "torch_steps", "torch_timing", "study_scoring", "study_report", "tfjs_reference"}


def _scripts():
  return sorted(p.stem for p in pathlib.Path(run_all.ROOT / "benchmarks").glob("*.py") if p.stem not in HELPERS)


def test_every_benchmark_is_run_by_run_all_or_shown_in_the_readme_as_a_module():
  readme = (run_all.ROOT / "benchmarks" / "README.md").read_text()
  in_run_all = {b.module for b in run_all.BENCHES}
  unreachable = [s for s in _scripts() if s not in in_run_all and f"python -m benchmarks.{s}" not in readme]
  assert not unreachable, f"add these to run_all.BENCHES or benchmarks/README.md (or delete them): {unreachable}"
  for readme_path in (run_all.ROOT / "README.md", run_all.ROOT / "benchmarks" / "README.md"):
    assert "python benchmarks/" not in readme_path.read_text(), f"{readme_path}: write `python -m benchmarks.NAME`"


def test_results_live_under_benchmarks_results_written_by_one_writer():
  for bench in run_all.BENCHES:
    assert bench.out.startswith(results.RESULTS_DIR + "/"), bench
  for script in _scripts():
    text = (run_all.ROOT / "benchmarks" / f"{script}.py").read_text()
    for writer in ("json.dump(", "write_text(json.dumps", "write_json("):
      assert writer not in text, f"{script} writes JSON with {writer}: write through results.write_report"


def test_interleaved_rounds_time_every_codec_each_round_in_rotated_order():
  from benchmarks import jpeg_throughput  # pylint: disable=g-import-not-at-top

  calls = []
  fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
  rates = jpeg_throughput.interleaved(fns, batch=4, rounds=3, reps=1)
  assert {n: len(v) for n, v in rates.items()} == {"a": 3, "b": 3, "c": 3}
  assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # after one warm-up call each


def test_jpeg_throughput_writes_rounds_and_names_each_gradient(tmp_path):
  pytest.importorskip("kornia")
  from benchmarks import jpeg_throughput  # pylint: disable=g-import-not-at-top

  out = tmp_path / "jpeg.json"
  jpeg_throughput.main(["--batch", "2", "--size", "16", "--rounds", "2", "--reps", "1", "--threads", "1",
                        "--no-compile", "--no-fidelity", "--no-dct-forms", "--out", str(out)])
  report = json.loads(out.read_text())
  rows = {"ours_ste_fwd", "ours_ste_fwd_bwd", "ours_cubic_fwd", "ours_cubic_fwd_bwd", "kornia_fwd", "kornia_fwd_bwd"}
  assert set(report["throughput_per_round"]) == rows
  assert all(len(v) == 2 and min(v) > 0 for v in report["throughput_per_round"].values())
  assert set(report["gradients"]) == {"ours_ste", "ours_cubic", "kornia"}
  assert report["settings"]["torch_threads"] == 1 and "--no-compile" in report["command"]
  assert report["command"].startswith("python -m benchmarks.jpeg_throughput ") and report["machine"]["load_average"]


def test_fr_throughput_interleaves_and_agrees(tmp_path):
  pytest.importorskip("torch")
  from benchmarks import fr_throughput  # pylint: disable=g-import-not-at-top

  out = tmp_path / "fr.json"
  assert fr_throughput.main(["--archs", "mobilefacenet", "--batch", "2", "--rounds", "2", "--iters", "1",
                             "--threads", "1", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  (row,) = report["results"]
  assert len(row["flax_s_per_round"]) == 2 and len(row["torch_s_per_round"]) == 2
  assert row["max_abs_diff"] < 1e-4 and row["flax_over_torch"] > 0
  assert report["machine"]["torch_threads"] == 1


def test_batched_surrogates_is_the_same_fr_work(tmp_path):
  """One call of [x, flip(x)] gives the value, input gradient and HVP of two separate calls."""
  from benchmarks import batched_surrogates  # pylint: disable=g-import-not-at-top

  out = tmp_path / "batched.json"
  assert batched_surrogates.main(["--image-size", "32", "--batch", "2", "--rounds", "2", "--steps", "1",
                                  "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert set(rows) == {"value", "grad", "hvp"}
  for what, row in rows.items():
    assert row["max_rel_diff"] < 1e-4, what
    assert len(row["separate_s_per_round"]) == 2 and row["batched_over_separate"] > 0


@pytest.mark.assets
def test_fr_throughput_times_a_real_model(assets_dir, tmp_path, monkeypatch):
  """`--real NAME` times a real model (`shared:NAME`) unfolded and folded, with no torch side."""
  pytest.importorskip("torch")
  from benchmarks import fr_throughput  # pylint: disable=g-import-not-at-top

  del assets_dir
  monkeypatch.setenv("ERASABLEMASK_FR_CACHE", str(tmp_path / "cache"))
  out = tmp_path / "fr_real.json"
  assert fr_throughput.main(["--archs", "", "--real", "mobileface_v3", "--batch", "2", "--rounds", "2", "--iters", "1",
                             "--threads", "1", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  (row,) = report["real_models"]
  assert report["results"] == [] and row["model"] == "mobileface_v3" and row["input_size"] == [112, 112]
  assert len(row["s_per_round"]["folded"]) == 2 and row["folded_max_abs_diff"] < 1e-5 and row["ms_per_image"] > 0


def test_transfer_study_split_a_chosen_target_keeps_the_drawn_held_out_faces():
  from benchmarks import transfer_study  # pylint: disable=g-import-not-at-top

  faces = {"identity": np.repeat(np.arange(20), 3)}
  drawn, held_out = transfer_study.split(faces, 5, seed=0)
  chosen = next(i for i in range(20) if i != drawn and i not in held_out)
  assert transfer_study.split(faces, 5, seed=0, target=chosen) == (chosen, held_out)
  with pytest.raises(SystemExit, match="not held out"):
    transfer_study.split(faces, 5, seed=0, target=held_out[0])
  # A drawn target leaves the study's key as it was before the option existed, so its JSON still resumes.
  assert "target_identity" not in transfer_study.Settings().key()
  assert transfer_study.Settings(target_identity=chosen).key()["target_identity"] == chosen
  args = transfer_study.parse_args(["--target-identity", str(chosen)])
  assert args.out.endswith(f"transfer_study_target{chosen}.json") and args.workdir.endswith(f"_target{chosen}")


def test_pod_compile_derives_training_time_largest_batch_and_marks_quick_compiles(tmp_path):
  gib = 2**30

  def stage(n, effort):
    return {"stage": n, "compile_s": 1.0, "compile_effort": effort, "chip_bytes": 16 * gib, "fits": True,
            "per_chip_bytes": {"argument": 2 * gib, "output": 2 * gib, "alias": 2 * gib, "temp": gib, "total": 3 * gib},
            "flops": 1e12, "bytes_accessed": 3 * gib, "roofline_s": 0.01, "collective_s": 0.0025,
            "collective_share": 0.2, "roofline_source": "compiler" if effort else "flops_bytes_over_peaks"}

  run = {"config": "celebahq_paper", "overrides": [], "chip": "TPU v5e", "chips": 16, "hosts": 4, "global_batch": 32,
         "mesh_state": "replicated", "surrogates": [], "stages": [stage(1, 0.0), stage(2, -1.0)]}
  (tmp_path / "paper__v5e-4x4.json").write_text(json.dumps(run))
  report = pod_compile.collect(tmp_path, ["paper", "study"], ["v5e:4x4", "v5e:2x4"])
  assert len(report["runs"]) == 1 and not report["runs"][0]["complete"]  # stage 3 missing; the absent runs skipped
  d = report["runs"][0]["derived"]
  assert d["steps_per_epoch"] == 938  # ceil(30000 / 32)
  # 12.5 ms a step (roofline + collectives) x 938 steps x 200 epochs (stage 1) and x 100 (stage 2).
  assert d["stages"][1]["wall_h"] == pytest.approx(0.0125 * 938 * 200 / 3600)
  assert d["wall_h"] == pytest.approx(0.0125 * 938 * 300 / 3600)
  # 2 faces per chip use 1 GiB of temporaries; 16 - (2 + 2 - 2) GiB left holds 28 faces.
  assert d["stages"][1]["largest_per_chip_batch"] == 28
  rows = pod_compile.table(report).splitlines()[2:]
  assert [r.split(" | ")[3] for r in rows] == ["1", "2 (effort -1)"]
  assert [r.split(" | ")[6] for r in rows] == ["10.0 ms", "10.0 ms (XLA)"]  # whose roofline it is


def test_pod_compile_says_when_the_compiler_crashes_and_goes_on(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(pod_compile.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=-11))
  assert pod_compile.compile_one("study", "v6e:2x4", tmp_path, None, 60.0) == -11
  assert "the compiler crashed (signal 11)" in capsys.readouterr().out
