"""`erasablemask compile` (erasablemask_jax/aot.py): the report's figures, its parsing of collectives and rooflines, and
a real ahead-of-time compile of the tiny config with the attack on for a one-host and a two-host TPU slice.

The compiles need libtpu (the `tpu` extra); without it they skip, and the command itself says how to get it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from erasablemask_jax import aot
from erasablemask_jax import cli
from erasablemask_jax.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
ATTACK_ON = '--config.fr.surrogates=("bundled:mobilefacenet","bundled:mobilefacenet@flip")'

HLO = """
  %all-reduce.1 = f32[64,32]{1,0} all-reduce(f32[64,32]{1,0} %p), replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce.2 = (f32[8]{0}, bf16[4,4]{1,0}) all-reduce(f32[8]{0} %a, bf16[4,4]{1,0} %b), to_apply=%add
  %all-gather-start.3 = (f32[16]{0}, f32[64]{0}) all-gather-start(f32[16]{0} %c), dimensions={0}
  %all-gather-done.3 = f32[64]{0} all-gather-done((f32[16]{0}, f32[64]{0}) %all-gather-start.3)
  %all-reduce-start.5 = (f32[10]{0}, f32[6]{0}) all-reduce-start(f32[10]{0} %d, f32[6]{0} %e), to_apply=%add
  %all-reduce-done.5 = (f32[10]{0}, f32[6]{0}) all-reduce-done((f32[10]{0}, f32[6]{0}) %all-reduce-start.5)
  %fusion.4 = f32[64,32]{1,0} fusion(f32[64,32]{1,0} %all-reduce.1), kind=kLoop, calls=%fused
"""


def test_collectives_sum_result_bytes_and_count_async_pairs_once():
  found = {c["op"]: c for c in aot.collectives(HLO)}
  assert found["all-reduce"] == {"op": "all-reduce", "count": 3, "bytes": 64 * 32 * 4 + 8 * 4 + 16 * 2 + 16 * 4}
  assert found["all-gather"] == {"op": "all-gather", "count": 1, "bytes": 64 * 4}
  assert set(found) == {"all-reduce", "all-gather"}


def test_roofline_is_the_compilers_estimate_else_flops_and_bytes_over_the_chips_peaks():
  chip = aot.CHIPS["v5e"]
  assert aot.roofline({"flops": 1e12, "bytes_accessed": 1e9, "optimal_seconds": 0.5}, chip) == (0.5, "compiler")
  seconds, source = aot.roofline({"flops": 197e12, "bytes_accessed": 1e9, "optimal_seconds": -3.0}, chip)
  assert (seconds, source) == (pytest.approx(1.0), "flops_bytes_over_peaks")  # compute-bound
  seconds, _ = aot.roofline({"flops": 1.0, "bytes_accessed": 819e9 * 2, "optimal_seconds": -1.0}, chip)
  assert seconds == pytest.approx(2.0)  # memory-bound


def test_memory_total_counts_donated_arguments_once():
  stats = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=90, temp_size_in_bytes=50,
                                alias_size_in_bytes=80, generated_code_size_in_bytes=7)
  compiled = types.SimpleNamespace(memory_analysis=lambda: stats)
  assert aot.memory_bytes(compiled) == {"argument": 100, "output": 90, "temp": 50, "alias": 80, "generated_code": 7,
                                        "total": 160}


@pytest.mark.parametrize("name", ["v3:2x2", "v5e", "tpu:2x2"])
def test_unknown_topology_is_a_config_error(name):
  with pytest.raises(ConfigError, match="unknown TPU topology"):
    aot.chip_of(name)


def test_without_libtpu_compile_says_how_to_get_it(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
  assert cli.main(["compile", "--config", "smoke", "--topology", "v5e:2x2", "--no-compile-cache"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("erasablemask compile: compiling for a TPU needs libtpu") and 'pip install -e ".[tpu]"' in err
  assert len(err.splitlines()) == 1


STAGE_KEYS = {"stage", "per_chip_bytes", "chip_bytes", "fits", "flops", "bytes_accessed", "roofline_s",
              "roofline_source", "collectives"}


@pytest.mark.skipif(not HAVE_LIBTPU, reason='libtpu is not installed: pip install -e ".[tpu]" (the `tpu` extra) to '
                    "compile for TPU topologies")
@pytest.mark.parametrize("topology, chips, hosts, programs, effort", [
    ("v5e:2x2", 4, 1, "1,2,3,protect,restore", 0.0),
    # The attack's step across two hosts (each program costs CI minutes), compiled at the lowest effort (about half the
    # compile time).
    ("v4:2x2x2", 8, 2, "2", -1.0),
])
def test_tiny_config_with_the_attack_compiles_for_one_and_two_hosts(tmp_path, topology, chips, hosts, programs,
                                                                    effort):
  out = tmp_path / "compile.json"
  cmd = [sys.executable, "-m", "erasablemask_jax.cli", "compile", "--config", "smoke", "--topology", topology,
         "--out", str(out), "--programs", programs, ATTACK_ON, "--config.data.batch_size=8",
         f"--compile-effort={effort}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                        timeout=3000, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "could not determine" not in proc.stderr and "host bounds" not in proc.stderr, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert (report["topology"], report["chips"], report["hosts"]) == (topology, chips, hosts)
  stages = [p for p in programs.split(",") if p.isdigit()]
  assert [s["stage"] for s in report["stages"]] == [int(p) for p in stages]
  for stage in report["stages"]:
    assert STAGE_KEYS <= set(stage), stage["stage"]
    assert stage["compile_effort"] == effort
    assert set(stage["per_chip_bytes"]) == {"argument", "output", "temp", "alias", "total"}
    assert stage["fits"] and 0 < stage["per_chip_bytes"]["total"] < stage["chip_bytes"]
    assert stage["per_chip_bytes"]["alias"] > 0  # the state is donated
    assert stage["flops"] > 0 and stage["roofline_s"] > 0
    # The replicated state's gradients are summed over the chips.
    assert any(c["op"] == "all-reduce" and c["bytes"] > 0 for c in stage["collectives"]), stage["collectives"]
  if len(stages) == 3:
    flops = {s["stage"]: s["flops"] for s in report["stages"]}
    assert flops[2] > max(flops[1], flops[3])  # stage 2 differentiates through the surrogates (second order)
    assert {f["function"] for f in report["functions"]} == {"protect", "restore"}
  assert "stage 2" in proc.stdout and "roofline" in proc.stdout
  assert ("compiled at a lower effort" in proc.stdout) == (effort != 0), proc.stdout


@pytest.mark.parametrize("effort", [-1.5, 2.0])
def test_compile_effort_outside_xlas_range_is_a_config_error(effort):
  with pytest.raises(ConfigError, match=r"outside \[-1, 1\]"):
    aot.compile_run(types.SimpleNamespace(), "v5e:2x2", effort=effort)


def test_a_partial_rerun_keeps_the_programs_compiled_before(monkeypatch):
  """`--programs 3` on a report that holds stage 1 compiles stage 3 and keeps stage 1, in program order."""
  compiled = []

  class Lowered:
    def __init__(self, name):
      self.name = name

    def compile(self, compiler_options=None):
      compiled.append((self.name, compiler_options))
      return self.name

  class Fn:
    def __init__(self, name):
      self.name = name

    def lower(self, *args):
      return Lowered(self.name)

  monkeypatch.setattr(aot, "topology_devices", lambda topology, num_slices=1: [types.SimpleNamespace(process_index=0)])
  monkeypatch.setattr(aot, "programs", lambda config, devices, hosts, archs: (
      None, [], {n: (Fn(n), ()) for n in ("1", "2", "3", "protect", "restore")}))
  monkeypatch.setattr(aot, "analyse", lambda c, chip: {"flops": float(len(c))})
  config = types.SimpleNamespace(data=types.SimpleNamespace(batch_size=8), mesh={})
  earlier = {"stage": 1, "compile_s": 4330.0, "compile_effort": 0.0, "flops": 7.0}
  reports = []
  report = aot.compile_run(config, "v5e:2x2", only=["3"], done={"1": earlier}, on_result=reports.append, effort=-1.0)
  assert compiled == [("3", {"exec_time_optimization_effort": -1.0})]
  assert report["stages"][0] == earlier
  assert [(s["stage"], s["compile_effort"]) for s in report["stages"]] == [(1, 0.0), (3, -1.0)]
  assert report["functions"] == []
