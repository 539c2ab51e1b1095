"""The one-line errors of `train.preemption`: which failures are a lost host or a refused save, and what they say."""

import errno
import pathlib

import pytest

from erasablemask_jax.train import preemption

CHECKPOINTS = pathlib.Path("/runs/x/checkpoints")


@pytest.mark.parametrize("error, advice", [
    (ValueError("OUT_OF_RANGE: Error writing \"a/0\" in OCDBT database: Failed to write 2053136 bytes to file 4: "
                "No space left on device [os_error_code='28']"), "free some space"),  # tensorstore's form
    (OSError(errno.EROFS, "Read-only file system", "/runs/x/checkpoints/8.orbax-checkpoint-tmp"),
     "make the workdir writable"),
    (PermissionError(errno.EACCES, "Permission denied"), "make the workdir writable"),
])
def test_a_refused_save_names_the_step_the_reason_and_the_step_to_resume_from(error, advice):
  e = preemption.save_error(error, 8, CHECKPOINTS, 4)
  assert isinstance(e, OSError) and e.filename == str(CHECKPOINTS / "8")
  reason = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
            errno.EACCES: "Permission denied"}[e.errno]
  assert str(e) == (f"cannot save the checkpoint at step 8 in {CHECKPOINTS} ({reason}); the checkpoint at step 4 is "
                    f"intact; {advice}, then rerun the same command to resume from step 4")


def test_a_refused_first_save_says_the_run_starts_again():
  e = preemption.save_error(OSError(errno.ENOSPC, "No space left on device"), 4, CHECKPOINTS, None)
  assert str(e).endswith("no earlier checkpoint exists; free some space, then rerun the same command to start again")


def test_a_failure_that_is_not_the_file_systems_is_left_alone():
  assert preemption.save_error(ValueError("pytree structure error"), 8, CHECKPOINTS, 4) is None


@pytest.mark.parametrize("error, lost", [
    (ValueError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by "
                "peer [127.0.0.1]:51589"), True),
    (RuntimeError("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout."),
     True),
    (ValueError("operands could not be broadcast together"), False),
    (KeyError("UNAVAILABLE:"), False),
])
def test_lost_hosts_are_told_from_other_errors(error, lost):
  assert preemption.is_lost_host(error) is lost


def test_a_lost_host_becomes_one_line_only_on_several_hosts():
  class Manager:
    def latest_step(self):
      return 8

  with pytest.raises(preemption.HostLostError) as e:
    with preemption.stop_when_a_host_is_lost(Manager(), CHECKPOINTS, multihost=True):
      raise ValueError("UNKNOWN: Gloo AllReduce failed: Connection closed by peer")
  assert str(e.value) == ("another host of this run stopped (ValueError: UNKNOWN: Gloo AllReduce failed: Connection "
                          "closed by peer); see its log for why. This host stops too; the last complete checkpoint is "
                          f"step 8 in {CHECKPOINTS}; rerun the same command on every host to resume")
  with pytest.raises(ValueError):
    with preemption.stop_when_a_host_is_lost(Manager(), CHECKPOINTS, multihost=False):
      raise ValueError("UNKNOWN: Gloo AllReduce failed: Connection closed by peer")
