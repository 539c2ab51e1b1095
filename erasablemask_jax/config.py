"""Experiment configs: loading `path/to/file.py[:arg]` or a packaged `name[:arg]`, and applying `--config.a.b=value`
overrides.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision's convention). The loaded config
is locked: an override of an unknown key, or with a value that does not convert to the field's type, raises
`ConfigError` naming the key (and the closest known keys).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import pathlib
import sys
from collections.abc import Sequence

import ml_collections

_PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says what to change."""


def resolve_config_path(name: str) -> pathlib.Path:
  """A bare name such as `demo` (one of the packaged configs), or a path to a `.py` file that must exist.

  Anything with a directory or a `.py` suffix is a path: a missing `some/where/demo.py` is an error, never the packaged
  `demo`.
  """
  path = pathlib.Path(name)
  known = sorted(p.stem for p in _PACKAGED_CONFIGS.glob("*.py") if not p.stem.startswith("_"))
  if len(path.parts) == 1 and path.suffix != ".py":
    if name in known:
      return _PACKAGED_CONFIGS / f"{name}.py"
    raise ConfigError(f"no packaged config named {name!r}; the packaged ones are {', '.join(known)}, or give a path "
                      "to a .py file with get_config()")
  if not path.is_file():
    hint = f" (for the packaged one, write --config {path.stem})" if path.stem in known else ""
    raise ConfigError(f"config file {name} not found{hint}; give a path to an existing .py file with get_config(), "
                      f"or one of the packaged configs: {', '.join(known)}")
  if path.suffix != ".py":
    raise ConfigError(f"config file {name} is not a .py file; a config is a Python file defining get_config()")
  return path


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `file.py` or `file.py:arg`, calls its `get_config(arg)`, locks it and applies `key=value` overrides."""
  path_str, _, arg = spec.partition(":")
  path = resolve_config_path(path_str)
  root = str(path.resolve().parent.parent)
  if root not in sys.path:  # so that `from configs import default` works from a checkout
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(f"_erasablemask_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None) function")
  config = module.get_config(arg or None)
  config.lock()
  for override in overrides:
    key, sep, value = override.removeprefix(OVERRIDE_PREFIX).partition("=")
    if not sep:
      raise ConfigError(f"override {override!r} has no '=': write --config.{key}=VALUE")
    apply_override(config, key, value)
  return config


def _known_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_known_keys(v, f"{prefix}{k}."))
  return keys


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
  close = difflib.get_close_matches(key, _known_keys(config), n=3)
  hint = f"; did you mean {' or '.join(close)}?" if close else ""
  return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, current, raw: str):
  try:
    if isinstance(current, bool):
      lowered = raw.strip().lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError(raw)
      return lowered in ("true", "1")
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, str):
      return raw
    if isinstance(current, (tuple, list)):
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = tuple(s.strip() for s in raw.split(",") if s.strip())
      if isinstance(value, str):
        value = (value,)
      if not isinstance(value, (tuple, list)):
        raise ValueError(raw)
      return type(current)(value)
    if current is None:
      try:
        return ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        return raw
  except ValueError:
    pass
  else:
    raise ConfigError(f"config key {key!r} holds a {type(current).__name__}; it cannot be overridden from the command line")
  raise ConfigError(f"config key {key!r} expects a {type(current).__name__} (now {current!r}); got {raw!r}")


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets `config.<key>` from the string `raw`, converted to the existing field's type."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown_key(config, key)
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise _unknown_key(config, key)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key {key!r} is a group; override one of its fields, e.g. {key}.{next(iter(current.keys()))}")
  value = _coerce(key, current, raw)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"config key {key!r}: {e}") from None


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
  """Adds `--config FILE[:ARG]`; `--config.KEY=VALUE` overrides are collected by the CLI into `config_overrides`."""
  parser.add_argument("--config", required=required, metavar="FILE[:ARG]",
                      help="experiment config (a path, or a packaged name such as 'demo'); override fields with "
                           "--config.KEY=VALUE")
  parser.set_defaults(accepts_config_overrides=True)


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
  return load_config(args.config, getattr(args, "config_overrides", ()))
