"""One training run per workdir: a second `train` (CLI or `train_and_evaluate`) is refused; SIGKILL frees the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from erasablemask_jax import cli
from erasablemask_jax.config import load_config
from erasablemask_jax.train import lock as lock_lib
from erasablemask_jax.train import trainer as trainer_lib

# Holds the lock in another process (flock locks belong to an open file, so only another process is a real test).
HOLDER = textwrap.dedent("""
    import sys, time
    from erasablemask_jax.train.lock import workdir_lock
    with workdir_lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


@pytest.fixture(name="held")
def _held(tmp_path):
  """A workdir whose lock a subprocess holds; yields (workdir, process)."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    yield workdir, proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=60)


def test_second_lock_is_refused_and_sigkill_releases_it(held):
  workdir, proc = held
  with pytest.raises(lock_lib.WorkdirBusyError, match=f"workdir {workdir} is in use .*pid {proc.pid} on "):
    with lock_lib.workdir_lock(workdir):
      pass
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  with lock_lib.workdir_lock(workdir):  # no stale lock after a kill
    assert (workdir / lock_lib.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_one_process_cannot_lock_twice_and_unlocks_on_error(tmp_path):
  with lock_lib.workdir_lock(tmp_path):
    with pytest.raises(lock_lib.WorkdirBusyError):
      with lock_lib.workdir_lock(tmp_path):
        pass
  with pytest.raises(KeyError):
    with lock_lib.workdir_lock(tmp_path):
      raise KeyError("boom")
  with lock_lib.workdir_lock(tmp_path):
    pass
  with lock_lib.workdir_lock(tmp_path, enabled=False), lock_lib.workdir_lock(tmp_path):
    pass  # disabled (a non-chief host) takes no lock


def test_cli_train_on_a_busy_workdir_exits_1_with_one_line(held, capsys):
  workdir, _ = held
  assert cli.main(["train", "--config", "smoke", "--workdir", str(workdir)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"erasablemask train: workdir {workdir} is in use by another training run")
  assert err.count("\n") == 1
  assert sorted(p.name for p in workdir.iterdir()) == [lock_lib.LOCK_FILE]  # nothing written


def test_train_and_evaluate_takes_the_lock(held, monkeypatch):
  workdir, _ = held
  monkeypatch.setattr(trainer_lib, "Trainer", lambda *a, **k: pytest.fail("trained on a busy workdir"))
  with pytest.raises(lock_lib.WorkdirBusyError):
    trainer_lib.train_and_evaluate(load_config("smoke"), workdir)
