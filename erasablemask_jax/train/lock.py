"""One training run per workdir: `workdir_lock(workdir)` holds an advisory lock on `workdir/train.lock`.

Two runs on one workdir would interleave their checkpoints and both finish "successfully". The lock is
`fcntl.flock` on an open file, which the kernel drops when the holder's file is closed, however the process ends
(SIGKILL and power loss included), so a crashed run never leaves a stale lock: rerunning resumes. The lock file itself
stays (removing it would let a third run lock a fresh file while the second still holds the old one); its content, the
holder's pid and host, is only for the message a second run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

LOCK_FILE = "train.lock"

log = logging.getLogger(__name__)


class WorkdirBusyError(RuntimeError):
  """Another process holds the workdir's lock; the message names the workdir and the holder."""


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
  """Holds `workdir/train.lock` (creating the workdir) for the body; raises `WorkdirBusyError` if it is held.

  Args:
    workdir: the training run's directory.
    enabled: False makes this a no-op (multi-host runs lock on process 0 only: every host of one run shares the
      workdir).

  Raises:
    WorkdirBusyError: another run holds the lock; nothing was changed.
  """
  if not enabled:
    yield
    return
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirBusyError(f"workdir {workdir} is in use by another training run ({holder}); wait for it to finish "
                             "or choose another --workdir") from None
    except OSError as e:  # a file system without flock (some network mounts): train, but unguarded
      log.warning("cannot lock %s (%s); nothing stops a second run on this workdir", workdir / LOCK_FILE, e)
    else:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
