"""Stopping a run cleanly: on a signal, when another host is lost, when a checkpoint cannot be written.

Signals (`stop_on_signals`). A first SIGINT (Ctrl-C) or SIGTERM (what a TPU VM, Kubernetes or SLURM sends before
taking a machine away) asks the loop to stop after the current step; the loop saves that step and raises
`TrainingInterrupted`, whose message says where the checkpoint is and how to resume. A second signal stops at once,
losing only the steps after the last checkpoint.

- One host: the loop stops at the next step (`StopRequest.due`).
- Several hosts: every host must save the same step, or their collective save hangs. `jax.distributed.initialize`
  starts JAX's preemption service, whose notifier owns SIGTERM (a C++ handler, which ours would replace): on a SIGTERM
  to any host it tells the coordination service, every host's sync manager agrees on the step after the fastest
  host's, and `CheckpointManager.reached_preemption(n)` (orbax, over `multihost_utils.reached_preemption_sync_point`)
  is true at that step on every host. A Ctrl-C is handed to it as a SIGTERM to the same process, and a second Ctrl-C
  then ends this host at once. A second SIGTERM is left to JAX, which ignores it: on a pod every host gets its own
  SIGTERM at about the same time, while they save, and the save must not be cut short (SIGKILL, which the scheduler
  sends when its grace period is over, ends a host whatever it does).

  The sync manager counts calls, not steps: it sets the sync point to the largest count reported + 1, and a host that
  has not called it yet reports 0. So `due` passes the number of its own calls (the same on every host: they start
  from the same checkpoint and call once per step), never the global step: a notice that arrives while a resumed run
  is still compiling then stops it at its first step instead of being lost.

Lost hosts (`stop_when_a_host_is_lost`). When a host dies (SIGKILL, a crash, a machine taken away without notice),
the others fail in their next collective (on CPU gloo reports the closed connection at once) or in a barrier once the
coordination service has missed the dead host's heartbeats for `--heartbeat-timeout` seconds (`train.mesh`); where a
collective would wait forever (TPU, GPU), JAX itself ends every process after that time ("Terminating process because
the JAX distributed service detected fatal errors"). Either way no host waits longer than the heartbeat timeout, and
the error that surfaces in Python becomes `HostLostError`: one line with the last complete checkpoint and how to resume.

Failed saves (`save_error`). A full disk or a read-only workdir during a save raises from orbax (as an `OSError`, or
as tensorstore's `ValueError` carrying the `os_error_code`); orbax writes each step into a temporary folder and
renames it only once complete, so the previous checkpoint is intact and no half-written step is ever taken for a
finished one. The run stops with `CheckpointSaveError`: one line naming the step, the reason and the step to resume
from.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import signal
import threading
from collections.abc import Iterator

import jax

from erasablemask_jax.train.checkpoint import error_summary, ignore_late_io_callbacks

log = logging.getLogger(__name__)

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(KeyboardInterrupt):
  """A signal stopped the run after a step that was then saved; the message says where and how to resume.

  `exit_status` is 128 + the signal's number, as a shell reports a process ended by it: 130 after Ctrl-C, 143 after
  SIGTERM (also on the hosts of a multi-host run that were stopped because another host got one).
  """

  def __init__(self, step: int, checkpoints: pathlib.Path, signum: int | None = signal.SIGINT, hosts: int = 1):
    self.step = step
    self.signum = signal.SIGTERM if signum is None else signum  # None: JAX's preemption notice (SIGTERM to a host)
    self.exit_status = 128 + int(self.signum)
    if hosts == 1:
      what = "interrupted" if self.signum == signal.SIGINT else "stopped by SIGTERM"
      where, how = "", "rerun the same command"
    else:
      what = ("stopped by Ctrl-C on this host" if signum == signal.SIGINT else
              "stopped by a preemption notice (SIGTERM to one of the hosts)")
      where, how = f" (all {hosts} hosts saved this step)", "rerun the same command on every host"
    super().__init__(f"{what}: saved a checkpoint at step {step} in {checkpoints}{where}; {how} to resume from it")


class HostLostError(RuntimeError):
  """Another host of a multi-host run stopped mid-run; the message names the last complete checkpoint."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (full disk, read-only workdir); the message names the step to resume from."""

  def __init__(self, code: int, path: str, message: str):
    super().__init__(code, os.strerror(code), path)
    self.message = message

  def __str__(self) -> str:
    return self.message


# ---------------------------------------------------------------------------------------------------------------------
# Signals.

class StopRequest:
  """What the signal handlers of `stop_on_signals` set, and the loop's question once per step: stop here?"""

  def __init__(self, manager=None, multihost: bool = False):
    self.signum: int | None = None  # the first signal this process received
    self._manager = manager
    self._multihost = multihost
    self._calls = 0

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def due(self) -> bool:
    """True when the loop should save the state it holds and stop; call it once per step, on every host.

    One host: after its first signal. Several: at the step the preemption service agreed on, the same on every host.
    """
    if not self._multihost:
      return self.requested
    self._calls += 1
    return self._manager.reached_preemption(self._calls)


@contextlib.contextmanager
def stop_on_signals(manager=None, multihost: bool = False) -> Iterator[StopRequest]:
  """While the body runs, SIGINT and SIGTERM ask the loop to save and stop (module docstring); yields the request.

  Args:
    manager: the run's orbax `CheckpointManager` (its `reached_preemption` is asked on several hosts).
    multihost: whether the run spans several processes joined by `jax.distributed`.
  """
  stop = StopRequest(manager, multihost)
  if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
    yield stop
    return
  if multihost and not _jax_preemption_service():
    log.warning("JAX's preemption service is off (jax_enable_preemption_service): a signal ends this host without "
                "saving, and the others stop when they miss it")
    yield stop
    return

  def request(signum, frame):
    del frame
    if stop.requested:
      raise KeyboardInterrupt
    stop.signum = signum
    if not multihost:
      log.warning("%s: stopping after this step and saving a checkpoint (%s again stops at once, without saving)",
                  SIGNAL_NAMES[signum], "Ctrl-C" if signum == signal.SIGINT else "a second signal")
      return
    log.warning("Ctrl-C: every host stops at the step they agree on and saves a checkpoint there (Ctrl-C again stops "
                "this host at once, without saving)")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier takes it from here and tells every host

  # On several hosts SIGTERM stays with JAX's notifier (a handler of ours would take it over).
  watched = (signal.SIGINT,) if multihost else (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.signal(s, request) for s in watched}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _jax_preemption_service() -> bool:
  return bool(jax.config.jax_enable_preemption_service)


# ---------------------------------------------------------------------------------------------------------------------
# Lost hosts.

# What the runtime says when a peer is gone: gloo's closed connections on CPU, the coordination service's missed
# heartbeats and failed barriers on every platform.
_LOST_HOST_MARKERS = ("Gloo", "Connection closed by peer", "Connection reset by peer", "heartbeat", "Barrier failed",
                      "coordination service", "UNAVAILABLE:", "DEADLINE_EXCEEDED:")


def is_lost_host(error: BaseException) -> bool:
  """Whether `error` is the distributed runtime reporting that another process of the run is gone."""
  return isinstance(error, (RuntimeError, ValueError)) and any(m in str(error) for m in _LOST_HOST_MARKERS)


@contextlib.contextmanager
def stop_when_a_host_is_lost(manager, checkpoints: pathlib.Path, multihost: bool) -> Iterator[None]:
  """On several hosts, turns the runtime's report of a lost peer into `HostLostError` (module docstring)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not multihost or not is_lost_host(e):
      raise
    last = manager.latest_step()
    where = "there is no checkpoint yet (a rerun starts from step 0)" if last is None else (
        f"the last complete checkpoint is step {last} in {checkpoints}")
    raise HostLostError(f"another host of this run stopped ({error_summary(e, 160)}); see its log for why. This host "
                        f"stops too; {where}; rerun the same command on every host to resume") from e


# ---------------------------------------------------------------------------------------------------------------------
# Failed saves.

_ADVICE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EFBIG: "free some space or raise "
           "the file size limit (ulimit -f)", errno.EROFS: "make the workdir writable", errno.EACCES: "make the "
           "workdir writable", errno.EPERM: "make the workdir writable"}


def save_error(error: BaseException, step: int, checkpoints: pathlib.Path,
               last_step: int | None) -> CheckpointSaveError | None:
  """The one-line error for a save of `step` that failed with `error`, or None when it is not the file system's."""
  code = _errno(error)
  if code is None:
    return None
  reason = os.strerror(code)
  advice = _ADVICE.get(code, "check the disk")
  if last_step is None:
    rest = f"no earlier checkpoint exists; {advice}, then rerun the same command to start again"
  else:
    rest = (f"the checkpoint at step {last_step} is intact; {advice}, then rerun the same command to resume from "
            f"step {last_step}")
  return CheckpointSaveError(code, str(checkpoints / str(step)),
                             f"cannot save the checkpoint at step {step} in {checkpoints} ({reason}); {rest}")


@contextlib.contextmanager
def file_system_errors_in_one_line() -> Iterator[None]:
  """While saving, orbax's threads log a write the file system refused with its whole traceback; keep their message.

  The save then raises `CheckpointSaveError`, one line; asyncio would also print the traceback of each of the save's
  other writes, which failed the same way, as their tasks are collected, and tensorstore one for each write that
  finishes after orbax closed its loop, so both are quieted once a save failed.
  """
  quiet = _WithoutFileSystemTracebacks()
  logging.getLogger("absl").addFilter(quiet)
  # Installed before the save, not after it failed: the late callbacks of the save's other writes can reach the closed
  # loop before the failure reaches us (seen on the 2-core VM).
  ignore_late_io_callbacks()
  try:
    yield
  except Exception as e:
    if _errno(e) is not None:
      logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    raise
  finally:
    logging.getLogger("absl").removeFilter(quiet)


class _WithoutFileSystemTracebacks(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and _errno(record.exc_info[1]) is not None:
      record.exc_info = record.exc_text = None
    return True


def _errno(error: BaseException | None) -> int | None:
  """The errno of a file-system failure: an `OSError`'s, or the one tensorstore writes into its `ValueError`s."""
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno
  match = re.search(r"os_error_code='?(\d+)", str(error)) if isinstance(error, (ValueError, RuntimeError)) else None
  return int(match[1]) if match else None
