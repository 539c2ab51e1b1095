"""The `erasablemask` command line.

Each subcommand lives in its own module under `erasablemask_jax.commands`; a module there exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable taking the parsed arguments and returning
an exit code. Modules are discovered, so adding a command is adding a file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from erasablemask_jax import commands
from erasablemask_jax.config import OVERRIDE_PREFIX, ConfigError


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="erasablemask",
      description="ErasableMask in JAX: train, protect, erase, evaluate, calibrate and align faces.",
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"{commands.__name__}.{info.name}")
    module.register(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
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
  try:
    return int(args.func(args) or 0)
  except ConfigError as e:
    print(f"erasablemask {args.command}: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
