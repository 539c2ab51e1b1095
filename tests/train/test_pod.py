"""`erasablemask train` as users start it on a pod, and the faults a pod meets, each resumed to the uninterrupted state.

Every run is the command itself (`python -m erasablemask_jax.cli train ...`), on one process or on two CPU processes
joined by --coordinator-address/--num-processes/--process-id on 127.0.0.1 (gloo collectives): the plain run, SIGTERM
on one host, a host killed with SIGKILL, a damaged newest checkpoint and a save the file system refuses. The model is
the smoke config shrunk to 16x16 and 3-layer networks, stage 1 only (16 steps, a checkpoint every 4), so that one
program is compiled per process count and the shared compilation cache (conftest) serves every later run. JAX writes
that cache from process 0 only, and on CPU the cache keys differ between processes, so process 1 compiles in every
two-process run: the faults are therefore met by runs resumed from a copy of the uninterrupted run's checkpoint at step
4, which skips the compile of the initial state.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from erasablemask_jax import cli
from erasablemask_jax.train import checkpoint as checkpoint_lib
from erasablemask_jax.train import trainer as trainer_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS, EVERY = 16, 4
HEARTBEAT_S = 10
OVERRIDES = ["--config.data.manual_dir=bundled:sample_faces", "--config.image_size=16", "--config.model.enc_layers=3",
             "--config.model.dec_layers=3", "--config.model.dis_layers=3", f"--config.schedule.stage1_steps={STEPS}",
             "--config.schedule.stage2_steps=0", "--config.schedule.stage3_steps=0",
             f"--config.train.checkpoint_every_steps={EVERY}", "--config.train.max_checkpoints_to_keep=10",
             "--config.train.sample_every_steps=1000"]


def _command(workdir, *extra):
  return [sys.executable, "-m", "erasablemask_jax.cli", "train", "--config", "smoke", *OVERRIDES, "--workdir",
          str(workdir), *extra]


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(workdir, **kwargs) -> list[subprocess.Popen]:
  """Process 0 and 1 of a two-host run of `_command(workdir)`, as a user starts them on each host."""
  port = _free_port()
  return [subprocess.Popen(_command(workdir, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                    "--process-id", str(i), "--heartbeat-timeout", str(HEARTBEAT_S)),
                           env=_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           **kwargs) for i in range(2)]


def _finish(procs, timeout=600) -> list[tuple[int, str]]:
  """`(exit status, stderr)` of each process, once all have ended."""
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, err))
  return out


def _run_pair(workdir):
  results = _finish(_start_pair(workdir))
  for status, err in results:
    assert status == 0, err[-3000:]


def _run_one(workdir, shell_first=None):
  """One process; `shell_first`: a shell command run before it, as a user's `ulimit`."""
  command = _command(workdir)
  if shell_first:
    command = ["bash", "-c", f'{shell_first} && exec "$@"', "bash", *command]
  return subprocess.run(command, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def _logged_steps(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return sum(1 for line in path.read_text().splitlines() if line.endswith("}")) if path.is_file() else 0


def _wait_for_step(workdir, step, procs, timeout=600):
  """Waits until process 0 has logged `step`; fails if a process ends first."""
  deadline = time.monotonic() + timeout
  while _logged_steps(workdir) < step:
    for p in procs:
      assert p.poll() is None, f"a process ended before step {step}: {p.communicate()[1][-3000:]}"
    assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
    time.sleep(0.05)


def _state(workdir, step=None) -> list[np.ndarray]:
  """Every leaf of the saved train state (networks, Adam state, rng, step) at `step` (default: the latest)."""
  state = checkpoint_lib.restore_run(workdir, step)[2]
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def _assert_same_state(a, b):
  assert len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def _metrics(workdir) -> list[dict]:
  """metrics.jsonl's rows without their wall-clock times."""
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def _steps_saved(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _last_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.startswith("erasablemask train:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


def _copy_at(workdir, step, to) -> pathlib.Path:
  """A copy of `workdir` whose newest checkpoint is `step` (the later ones moved out): a run stopped there."""
  shutil.copytree(workdir, to)
  later = to.parent / f"{to.name}-later"
  later.mkdir()
  for s in _steps_saved(to):
    if s > step:
      shutil.move(to / "checkpoints" / str(s), later / str(s))
  rows = (to / "metrics.jsonl").read_text().splitlines(keepends=True)
  (to / "metrics.jsonl").write_text("".join(rows[:step]))  # one row per step: the run's rows up to `step`
  return to


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one") / "run"
  proc = _run_one(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two") / "run"
  _run_pair(workdir)
  return workdir


def test_two_processes_start_finish_and_train_what_one_process_trains(two_processes, one_process):
  assert _steps_saved(two_processes) == list(range(EVERY, STEPS + 1, EVERY))
  one = trainer_lib.params_of(checkpoint_lib.restore_run(one_process)[2])
  two = trainer_lib.params_of(checkpoint_lib.restore_run(two_processes)[2])
  worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)))
  assert worst <= 1e-5, f"two processes differ from one by {worst}"  # the same global batches, summed in another order
  assert [row["step"] for row in _metrics(two_processes)] == list(range(1, STEPS + 1))


def test_sigterm_on_one_host_saves_the_same_step_on_both_and_the_rerun_resumes_exactly(two_processes, tmp_path):
  workdir = _copy_at(two_processes, EVERY, tmp_path / "run")
  procs = _start_pair(workdir)
  _wait_for_step(workdir, EVERY + 2, procs)
  # Process 0 held still while the notice travels, so that the run cannot end before the hosts agree on a step.
  procs[0].send_signal(signal.SIGSTOP)
  procs[1].send_signal(signal.SIGTERM)
  time.sleep(2.5)  # JAX's notifier looks for SIGTERM once a second
  procs[0].send_signal(signal.SIGCONT)
  results = _finish(procs)
  assert [status for status, _ in results] == [143, 143], [err[-3000:] for _, err in results]
  lines = [_last_line(err) for _, err in results]
  step = int(lines[0].split(" at step ")[1].split()[0])
  assert lines[0] == lines[1] == (
      f"erasablemask train: stopped by a preemption notice (SIGTERM to one of the hosts): saved a checkpoint at step "
      f"{step} in {workdir / 'checkpoints'} (all 2 hosts saved this step); rerun the same command on every host to "
      "resume from it")
  assert EVERY + 2 <= step < STEPS and _steps_saved(workdir)[-1] == step
  _run_pair(workdir)  # the same commands again
  _assert_same_state(_state(workdir), _state(two_processes))
  assert _metrics(workdir) == _metrics(two_processes)


def test_a_killed_host_stops_the_other_with_one_line_and_the_rerun_resumes_exactly(two_processes, tmp_path):
  workdir = _copy_at(two_processes, EVERY, tmp_path / "run")
  procs = _start_pair(workdir)
  _wait_for_step(workdir, 2 * EVERY + 1, procs)  # the checkpoint at step 2 * EVERY is complete
  procs[0].send_signal(signal.SIGSTOP)  # held still so that the run is mid-way when process 1 dies
  procs[1].kill()
  killed_at = time.monotonic()
  procs[0].send_signal(signal.SIGCONT)
  (status0, err0), (status1, _) = _finish(procs, timeout=HEARTBEAT_S + 120)
  assert status1 == -signal.SIGKILL
  assert time.monotonic() - killed_at < HEARTBEAT_S + 60, "the surviving host did not stop in time"
  last = _steps_saved(workdir)[-1]
  assert status0 == 1 and 2 * EVERY <= last < STEPS, err0[-3000:]
  line = _last_line(err0)
  assert line.startswith("erasablemask train: another host of this run stopped (")
  assert line.endswith(f"the last complete checkpoint is step {last} in {workdir / 'checkpoints'}; rerun the same "
                       "command on every host to resume")
  _run_pair(workdir)
  _assert_same_state(_state(workdir), _state(two_processes))
  assert _metrics(workdir) == _metrics(two_processes)


def _biggest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before(one_process, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(one_process, workdir)
  damaged = _biggest_file(workdir / "checkpoints" / str(STEPS))
  os.truncate(damaged, damaged.stat().st_size // 2)  # as a disk that filled up during a copy leaves it
  proc = _run_one(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f"the checkpoint at step {STEPS} is damaged (" in proc.stderr
          and f"resuming from step {STEPS - EVERY}, the newest intact one" in proc.stderr), proc.stderr[-3000:]
  assert (workdir / "checkpoints" / f"{STEPS}.damaged").is_dir()  # kept, not deleted
  _assert_same_state(_state(workdir), _state(one_process))
  assert _metrics(workdir) == _metrics(one_process)


def test_when_no_checkpoint_reads_back_the_resume_refuses_with_one_line_and_changes_nothing(one_process, tmp_path,
                                                                                            capsys):
  workdir = tmp_path / "run"
  shutil.copytree(one_process, workdir)
  for step in _steps_saved(workdir):
    (workdir / "checkpoints" / str(step) / "data" / "metadata").write_text('{"epoch": ')  # cut short
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert cli.main(["train", "--config", "smoke", *OVERRIDES, "--workdir", str(workdir)]) == 1
  err = _last_line(capsys.readouterr().err)
  assert err.startswith(f"erasablemask train: no checkpoint in {workdir / 'checkpoints'} reads back (step {STEPS}: ")
  assert err.endswith("put back intact copies of these folders, or train from step 0 in a new --workdir "
                               "(this one is left as it is)")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_a_save_the_file_system_refuses_stops_with_one_line_and_keeps_the_previous_checkpoint(one_process, tmp_path):
  previous = STEPS - EVERY
  workdir = _copy_at(one_process, previous, tmp_path / "run")  # the resumed run must save STEPS
  # Writes past 32 KiB fail with EFBIG, as on a full disk (Python ignores SIGXFSZ); the checkpoint's arrays are larger.
  proc = _run_one(workdir, shell_first="ulimit -f 32")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _last_line(proc.stderr) == (
      f"erasablemask train: cannot save the checkpoint at step {STEPS} in {workdir / 'checkpoints'} (File too large); "
      f"the checkpoint at step {previous} is intact; free some space or raise the file size limit (ulimit -f), then "
      f"rerun the same command to resume from step {previous}")
  assert _steps_saved(workdir)[-1] == previous  # no half-written step taken for a finished one
  _assert_same_state(_state(workdir), _state(one_process, previous))
