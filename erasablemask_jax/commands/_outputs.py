"""Where a command writes: checked before any work starts, and named in the command's last line.

`check_writable(path, flag)` refuses an output location that is a file, sits under a file, or cannot be written (a
read-only folder or file system), with one line naming the flag and the path, before a long computation would fail at
its end. `outputs_line(command, path, contents)` is the closing line every command prints.
"""

from __future__ import annotations

import errno
import os
import pathlib
import tempfile


class OutputLocationError(OSError):
  """An output folder (or a file's folder) that cannot be written; the message names the flag and what to do."""


def check_writable(path: str | os.PathLike[str], flag: str, *, is_file: bool = False) -> pathlib.Path:
  """Checks that `path` (a folder, or with `is_file` a file) can be created or written; nothing is created.

  Raises:
    OutputLocationError: the path (or a parent) is a file, or its nearest existing folder refuses a new file.
  """
  path = pathlib.Path(path)
  if is_file and path.is_dir():
    raise OutputLocationError(f"{flag} {path} is a folder; give a file name")
  if not is_file and path.exists() and not path.is_dir():
    raise OutputLocationError(f"{flag} {path} is a file, not a folder; choose a folder (or remove the file)")
  folder = path.parent if is_file else path
  existing = folder
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise OutputLocationError(f"{flag} {path}: {existing} is a file, so no folder can be made there; choose another "
                              "location")
  try:
    _probe(existing)
  except OSError as e:
    reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device"}.get(e.errno, e.strerror)
    raise OutputLocationError(f"{flag} {path}: cannot write in {existing} ({reason}); choose a writable location"
                              ) from None
  return path


def _probe(folder: pathlib.Path) -> None:
  """Creates and removes a file in `folder` (permission bits alone do not tell: root ignores them, ro mounts do not)."""
  with tempfile.TemporaryFile(dir=folder, prefix=".erasablemask-write-test-"):
    pass


def outputs_line(command: str, path: str | os.PathLike[str], contents: str = "") -> str:
  """`erasablemask CMD: outputs in PATH (contents)`: the last line of every command that writes."""
  return f"erasablemask {command}: outputs in {path}" + (f" ({contents})" if contents else "")
