"""The pure helpers of the benchmark scripts: exponent fits, profile self times, the run_all goal table."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import cost_sweep
from benchmarks import profile_summary
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
