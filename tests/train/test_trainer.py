"""The curriculum trainer: stage behaviour, exact resume after SIGKILL, 8 devices and 2 hosts equal to 1, errors."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from erasablemask_jax.train import mesh as mesh_lib
from erasablemask_jax.train import trainer as trainer_lib

RUN_TINY = pathlib.Path(__file__).with_name("run_tiny.py")


def _trainer(config, workdir, **kwargs):
  return trainer_lib.Trainer(config, workdir, source=tiny.tiny_source(config, n=16), surrogates=tiny.tiny_surrogates(),
                             target_images=tiny.tiny_target(config), **kwargs)


def _flat(tree) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _assert_close(a: dict, b: dict, atol: float):
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a)
  assert worst <= atol, f"max abs difference {worst} > {atol}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted single-process run of the tiny config (stages of 1, 3 and 1 steps), checkpointing every step."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny.tiny_config_for_process_tests("1,3,1")
  trainer = _trainer(config, workdir)
  state = trainer.run()
  restored = {}
  for step in trainer.checkpoints.all_steps():
    restored[step] = trainer.checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state()), data=ocp.args.JsonRestore()))["state"]
  return {"workdir": workdir, "final": _flat(trainer_lib.params_of(state)), "states": restored, "trainer": trainer}


def _run_tiny(workdir, out, *args, env=None, check=True):
  env = {**os.environ, **(env or {})}
  proc = subprocess.run([sys.executable, str(RUN_TINY), str(workdir), "--out", str(out), *args], env=env,
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"run_tiny failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def test_stage2_freezes_g_and_stage3_changes_only_r(reference):
  states = reference["states"]
  end1, end2, end3 = 1, 4, 5
  chex.assert_trees_all_equal(states[end1].g, states[end2].g)  # G frozen in stage 2 (params, stats, Adam state)
  for name in ("e_adv", "r", "d"):
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), getattr(states[end1], name).params,
                        getattr(states[end2], name).params)
    assert max(jax.tree.leaves(diff)) > 0, f"{name} did not train in stage 2"
  for name in ("g", "e_adv", "d"):
    chex.assert_trees_all_equal(getattr(states[end2], name), getattr(states[end3], name))
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), states[end2].r.params, states[end3].r.params)
  assert max(jax.tree.leaves(diff)) > 0
  # E_adv and R start stage 2 as copies of G: the first stage-2 step moved them away from G_enc / G.
  assert int(states[end3].step) == 5 and int(states[end2].adaptive.count) >= 1


def test_resume_after_sigkill_matches_uninterrupted_run(reference, tmp_path):
  workdir, out = tmp_path / "run", tmp_path / "params.npz"
  killed = _run_tiny(workdir, out, "--kill-at", "3", check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) <= 3  # killed in stage 2 (steps 2-4)
  _run_tiny(workdir, out)  # the same command again resumes
  _assert_close(dict(np.load(out)), reference["final"], atol=1e-6)
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert not leftovers, f"temporary checkpoint directories left behind: {leftovers}"


def _reference_at(reference, step):
  return _flat(trainer_lib.params_of(reference["states"][step]))


def test_eight_simulated_devices_match_one(reference, tmp_path):
  out = tmp_path / "params.npz"
  _run_tiny(tmp_path / "run", out, "--schedule", "1,2,0",
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
  _assert_close(dict(np.load(out)), _reference_at(reference, 3), atol=1e-5)


def test_eight_simulated_devices_with_sharded_state_match_one(reference, tmp_path):
  """`mesh.state = "sharded"` (parameters and Adam moments split over `data`, ZeRO-3 style) trains as one device."""
  out = tmp_path / "params.npz"
  proc = _run_tiny(tmp_path / "run", out, "--schedule", "1,2,0", "--mesh-state", "sharded", "--min-sharded-size", "64",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
  assert int(proc.stdout.split("sharded state leaves: ")[1].split()[0]) > 10  # the sharded layout is exercised
  _assert_close(dict(np.load(out)), _reference_at(reference, 3), atol=1e-5)


def test_sharded_layout_splits_the_largest_dividing_axis():
  assert mesh_lib.leaf_spec((3, 3, 64, 112), 8) == jax.sharding.PartitionSpec()  # 64,512 < MIN_SHARDED_SIZE = 65,536
  assert mesh_lib.leaf_spec((3, 3, 64, 128), 8) == jax.sharding.PartitionSpec(None, None, None, "data")  # 73,728
  assert mesh_lib.leaf_spec((4, 4, 512, 1024), 8) == jax.sharding.PartitionSpec(None, None, None, "data")
  assert mesh_lib.leaf_spec((4, 4, 1024, 3), 8, min_size=1) == jax.sharding.PartitionSpec(None, None, "data", None)
  assert mesh_lib.leaf_spec((5, 7, 9), 8, min_size=1) == jax.sharding.PartitionSpec()  # no axis divides
  assert mesh_lib.leaf_spec((1024,), 1, min_size=1) == jax.sharding.PartitionSpec()  # one device


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
  out = tmp_path / "params.npz"
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, str(RUN_TINY), str(tmp_path / "run"), "--out", str(out), "--schedule",
                             "1,2,0", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                             str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]
  _assert_close(dict(np.load(out)), _reference_at(reference, 3), atol=1e-5)


def test_batch_that_does_not_divide_is_a_clear_error():
  class FakeMesh:
    size = 8

  with pytest.raises(ValueError, match=r"data.batch_size=12 does not divide over 8 devices.*multiple of 8"):
    mesh_lib.check_batch_divides(12, FakeMesh())
  config = tiny.tiny_config_for_process_tests()
  config.data.batch_size = 6
  with pytest.raises(ValueError, match="does not divide over 4 hosts"):
    tiny.tiny_source(config, n=16, process_index=0, process_count=4)


class _PoisonedSource:
  """The tiny source, except that the batch of step `bad_step` carries NaN attribute labels."""

  def __init__(self, source, bad_step):
    self.source, self.bad_step, self.calls = source, bad_step, 0
    self.steps_per_epoch = source.steps_per_epoch

  def __next__(self):
    batch = next(self.source)
    self.calls += 1
    if self.calls == self.bad_step:
      batch = {**batch, "att_a": np.full_like(batch["att_a"], np.nan)}
    return batch

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state):
    self.source.set_state(state)


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path):
  config = tiny.tiny_config_for_process_tests("3,0,0")
  source = _PoisonedSource(tiny.tiny_source(config, n=16), bad_step=2)
  trainer = trainer_lib.Trainer(config, tmp_path, source=source, surrogates=tiny.tiny_surrogates(),
                                target_images=tiny.tiny_target(config))
  with pytest.raises(trainer_lib.NonFiniteLossError, match=r"non-finite loss at step 2 \(stage 1\): d/att = nan.*"
                                                           r"last good checkpoint \(step 1\)"):
    trainer.run()
  assert trainer.checkpoints.all_steps() == [1]  # nothing of step 2 was saved
  restored = trainer.checkpoints.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(trainer.abstract_state()), data=ocp.args.JsonRestore()))
  chex.assert_tree_all_finite(restored["state"])
