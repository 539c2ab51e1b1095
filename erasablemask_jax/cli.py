"""The `erasablemask` command line.

Each subcommand lives in its own module under `erasablemask_jax.commands`; a module there exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable taking the parsed arguments and returning
an exit code. Modules are discovered, so adding a command is adding a file.

Every command also takes `--verbose` (show the INFO logs of orbax and JAX and XLA's C++ warnings, which are hidden
otherwise) and `--no-compile-cache` (by default compiled XLA programs are cached under
`$XDG_CACHE_HOME/erasablemask/xla`, `~/.cache/erasablemask/xla`, so a second run of the same command skips its
compiles; `JAX_COMPILATION_CACHE_DIR` chooses another folder).

Errors end a command with one line on stderr: exit status 2 for a usage or config error, 1 for a runtime one (a missing
file, a full disk, ...); 130 after Ctrl-C (`erasablemask train`: 143 after SIGTERM, with the step it saved).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import logging
import os
import pathlib
import pkgutil
import sys

from erasablemask_jax import __version__
from erasablemask_jax import commands
from erasablemask_jax.config import OVERRIDE_PREFIX, ConfigError

# Loggers that speak at INFO on every run (orbax's save/restore steps through absl; JAX's "Unable to initialize
# backend 'tpu'" on machines without one): WARNING unless --verbose.
NOISY_LOGGERS = ("absl", "jax._src.xla_bridge", "jax._src.compiler", "jax._src.compilation_cache")
COMPILE_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def _version() -> str:
  try:
    jax_version = importlib.metadata.version("jax")
  except importlib.metadata.PackageNotFoundError:
    jax_version = "not installed"
  return f"erasablemask {__version__} (jax {jax_version}, Python {sys.version.split()[0]})"


def _add_global_flags(parser: argparse.ArgumentParser, default) -> None:
  parser.add_argument("--verbose", "-v", action="store_true", default=default,
                      help="show INFO logs (orbax, JAX) and XLA's C++ warnings, hidden by default")
  parser.add_argument("--no-compile-cache", action="store_true", default=default,
                      help="do not cache compiled XLA programs under ~/.cache/erasablemask/xla")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="erasablemask",
      description="ErasableMask in JAX: train, protect, erase, evaluate, calibrate and align faces.",
  )
  parser.add_argument("--version", action="version", version=_version())
  _add_global_flags(parser, False)
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"{commands.__name__}.{info.name}")
    module.register(subparsers)
  for sub in subparsers.choices.values():  # also after the command; SUPPRESS keeps a flag given before it
    _add_global_flags(sub, argparse.SUPPRESS)
  return parser


def quiet_native_logs(argv: list[str]) -> None:
  """Hides XLA's C++ log lines (the "Very slow compile?" banner and its kind) unless --verbose is in `argv`.

  Must run before JAX is imported: the C++ side reads TF_CPP_MIN_LOG_LEVEL once. A value the user set is kept.
  """
  if "--verbose" not in argv and "-v" not in argv:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def configure_logging(verbose: bool) -> None:
  """INFO to stderr for the project's loggers; the noisy third-party ones at WARNING unless `verbose`."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def default_compile_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "erasablemask" / "xla"


def use_compile_cache(enabled: bool = True) -> pathlib.Path | None:
  """Points JAX's persistent compilation cache at `default_compile_cache_dir()` (or $JAX_COMPILATION_CACHE_DIR).

  Programs that take over a second to compile are stored there and read back by the next run. Returns the folder,
  or None when disabled or when the folder cannot be created (then nothing is cached, with a warning).
  """
  if not enabled:
    return None
  folder = pathlib.Path(os.environ.get(COMPILE_CACHE_ENV) or default_compile_cache_dir())
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.getLogger(__name__).warning("no compilation cache: cannot create %s (%s)", folder, e.strerror)
    return None
  os.environ.setdefault(COMPILE_CACHE_ENV, str(folder))  # read when JAX is imported (and by child processes)
  if "jax" in sys.modules:  # already imported (tests, or a command module that imports it at the top)
    import jax  # pylint: disable=import-outside-toplevel

    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", str(folder))
  return folder


def os_error_line(e: OSError) -> str:
  """One line for an OSError that escaped a command: the file, what went wrong, and what to do."""
  if e.filename is None:
    return str(e)
  where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
  advice = {errno.ENOSPC: "free some space or write to another disk",
            errno.EDQUOT: "free some space or write to another disk",
            errno.EROFS: "the file system is read-only: write somewhere else",
            errno.EACCES: "check the permissions or write somewhere else",
            errno.EPERM: "check the permissions or write somewhere else",
            errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
            errno.EISDIR: "a folder stands where a file is needed: choose another path",
            errno.EEXIST: "choose another path"}.get(e.errno, "check the path")
  return f"{where}: {e.strerror or e}; {advice}"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  quiet_native_logs(argv)
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  overrides = [a for a in extra if a.startswith(OVERRIDE_PREFIX)]
  unknown = [a for a in extra if not a.startswith(OVERRIDE_PREFIX)]
  if unknown or (overrides and not getattr(args, "accepts_config_overrides", False)):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  args.config_overrides = overrides
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  configure_logging(args.verbose)
  use_compile_cache(not args.no_compile_cache)
  try:
    return int(args.func(args) or 0)
  except ConfigError as e:
    print(f"erasablemask {args.command}: config error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk, a folder that became read-only, ... mid-run
    print(f"erasablemask {args.command}: {os_error_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"erasablemask {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
