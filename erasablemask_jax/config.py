"""Experiment configs: loading `path/to/file.py[:arg]` or a packaged `name[:arg]`, and applying `--config.a.b=value`
overrides.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision's convention). The loaded config
is locked: an override of an unknown key, or with a value that does not convert to the field's type, raises
`ConfigError` naming the key (and the closest known keys); so does a size or batch that is not positive
(`check_values`), and a config file that does not import or whose `get_config` fails (naming the file and line).

Config files import the packaged base with `from configs import default`: `configs` is the installed package. No
folder near a config file is put on `sys.path` (a `tqdm.py` beside a user's config directory must never shadow the
installed library); a user's own folder named `configs` is added to the package's `__path__`, after the packaged
configs, so that `from configs import my_base` finds a sibling file there.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import pathlib
import traceback
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
  module = _import_config_file(path)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path} defines no get_config(arg=None) function")
  try:
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except Exception as e:  # the user's code: say where it failed, not a traceback
    raise ConfigError(f"get_config({arg or None!r}) of {path} failed{_line_in(e, path)}: {type(e).__name__}: {e}"
                      ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() of {path} returned a {type(config).__name__}, not an ml_collections.ConfigDict")
  upgrade_legacy(config)
  config.lock()
  for override in overrides:
    key, sep, value = override.removeprefix(OVERRIDE_PREFIX).partition("=")
    if not sep:
      raise ConfigError(f"override {override!r} has no '=': write --config.{key}=VALUE")
    apply_override(config, key, value)
  check_values(config)
  return config


def _import_config_file(path: pathlib.Path):
  """Executes a config file as a module of its own; a syntax error or a failing import is a `ConfigError`."""
  _add_user_configs_folder(path)
  module_spec = importlib.util.spec_from_file_location(f"_erasablemask_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{e.filename or path}, line {e.lineno}: syntax error ({e.msg}); fix the config file") from None
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"{path} failed to load{_line_in(e, path)}: {type(e).__name__}: {e}") from None
  return module


def _add_user_configs_folder(path: pathlib.Path) -> None:
  """Lets `from configs import X` in a user's `.../configs/file.py` find `.../configs/X.py` (after the packaged X)."""
  folder = path.resolve().parent
  if folder.name != "configs" or folder == _PACKAGED_CONFIGS:
    return
  try:
    import configs  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if str(folder) not in list(configs.__path__):
    configs.__path__.append(str(folder))


def _line_in(error: BaseException, path: pathlib.Path) -> str:
  """`" at line N"` of the innermost traceback frame in `path`, or ""."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if pathlib.Path(f.filename) == path.resolve()
           or f.filename == str(path)]
  return f" at line {lines[-1]}" if lines else ""


# Keys that are counts or sizes (when the config has them): zero or less is refused before anything is built.
POSITIVE_KEYS = ("image_size", "model.enc_dim", "model.enc_layers", "model.dec_dim", "model.dec_layers",
                 "model.max_dim", "model.dis_dim", "model.dis_layers", "model.dis_fc_dim", "data.batch_size",
                 "train.checkpoint_every_steps", "train.max_checkpoints_to_keep", "train.log_every_steps",
                 "train.sample_every_steps", "train.num_sample_images")
MESH_STATES = ("replicated", "sharded")  # where the train state lives (`train.mesh.state_shardings`)
NON_NEGATIVE_KEYS = ("model.shortcut_layers", "model.inject_layers", "schedule.stage1_epochs",
                     "schedule.stage2_epochs", "schedule.stage3_epochs", "data.worker_count")


def upgrade_legacy(config):
  """Rewrites, in place, the attack spellings of earlier versions, so that old config files and the `config.json` of
  old runs mean today what they meant then; returns `config`.

  - `attack.first_order = True` (with `attack.kind = "meta_auxiliary"`) is `attack.kind = "first_order"`; the field
    `attack.first_order` is dropped either way;
  - `attack.lr_inner < 0` ("the optimiser's learning rate") is `optim.lr`: a reference to it in a `ConfigDict` (an
    override of optim.lr still carries over), its value in a plain dict (a saved `config.json`);
  - a saved `config.json` without `loss.sigma1_reference_size` trained with sigma1 unscaled (0), and without
    `loss.l_era_id` with stage 3 on L_era alone (0).
  - a `mesh` without `state` (runs before the sharded-state option) replicated the state: `mesh.state = "replicated"`.

  Args:
    config: an unlocked `ConfigDict`, or the nested dict of a `config.json`.
  """
  loss = config.get("loss")
  if loss is not None and not isinstance(loss, ml_collections.ConfigDict):  # a saved config.json
    loss.setdefault("sigma1_reference_size", 0)  # trained with sigma1 as written, before SPEC's scaling rule
    loss.setdefault("l_era_id", 0.0)  # stage 3 was Eq. 16's L_era alone
  mesh = config.get("mesh")
  if mesh is not None and "state" not in mesh:
    mesh["state"] = "replicated"
  attack = config.get("attack")
  if attack is None:
    return config
  if "first_order" in attack:
    if attack["first_order"] and attack.get("kind") == "meta_auxiliary":
      attack["kind"] = "first_order"
    del attack["first_order"]
  lr_inner = attack.get("lr_inner")
  if isinstance(lr_inner, (int, float)) and lr_inner < 0:
    optim = config["optim"]
    attack["lr_inner"] = optim.get_ref("lr") * 1.0 if isinstance(optim, ml_collections.ConfigDict) else optim["lr"]
  return config


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming every size or count of `POSITIVE_KEYS` (`NON_NEGATIVE_KEYS`) that is <= 0 (< 0).

  Also `mesh.data` (-1 or 0: every device, else a device count) below -1, a `mesh.state` not in `MESH_STATES`, and an
  `image_size` that the encoder's `model.enc_layers` stride-2 layers cannot halve down to whole pixels (the decoder
  would not come back to it).
  """
  flat = dict(_leaves(config))
  bad = [f"{k}={flat[k]!r} (must be >= 1)" for k in POSITIVE_KEYS if k in flat and not _at_least(flat[k], 1)]
  bad += [f"{k}={flat[k]!r} (must be >= 0)" for k in NON_NEGATIVE_KEYS if k in flat and not _at_least(flat[k], 0)]
  if "mesh.data" in flat and not _at_least(flat["mesh.data"], -1):
    bad.append(f"mesh.data={flat['mesh.data']!r} (-1 for every device, or a device count)")
  if "mesh.state" in flat and flat["mesh.state"] not in MESH_STATES:
    bad.append(f"mesh.state={flat['mesh.state']!r} (one of {', '.join(MESH_STATES)})")
  size, layers = flat.get("image_size"), flat.get("model.enc_layers")
  if not bad and isinstance(size, int) and isinstance(layers, int) and size % 2**layers:
    bad.append(f"image_size={size} (must be a multiple of 2**model.enc_layers = {2**layers})")
  if bad:
    raise ConfigError(f"invalid config value{'s' if len(bad) > 1 else ''}: {', '.join(bad)}; set "
                      f"--config.{bad[0].split('=')[0]}=... to a valid value")


def _at_least(value, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield prefix + k, v


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
