"""A training run's directory: where each of its parts lives, and the one reader of each.

    WORKDIR/config.json     the run's config, rewritten by the trainer at each (re)start (`write_config`, `read_config`)
    WORKDIR/checkpoints/    orbax checkpoints, one `<step>/` folder each (`checkpoints_dir`, `latest_checkpoint_step`)
    WORKDIR/metrics.jsonl   one JSON row `{"step": int, name: float, ...}` per logged step (`read_metrics`)

Training, resuming, inference, evaluation, the sweep and calibration all read a run through here, so an old run's
`config.json` means the same to each of them (`config.upgrade_legacy`) and a folder that is no run is refused with the
same one line.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

from erasablemask_jax.config import upgrade_legacy

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class NotARunError(FileNotFoundError):
  """The folder holds no `config.json`: it is not a training run."""


def config_path(workdir: str | os.PathLike[str]) -> pathlib.Path:
  return pathlib.Path(workdir) / CONFIG_FILE


def read_config_dict(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """The run's `config.json` as a nested dict, with the spellings of earlier versions upgraded (`upgrade_legacy`).

  Raises:
    NotARunError: there is no `config.json` (the message says to pass the training --workdir).
    json.JSONDecodeError: the file is not valid JSON.
  """
  path = config_path(workdir)
  if not path.is_file():
    raise NotARunError(f"{workdir} is not a training run (no {CONFIG_FILE}); pass the --workdir used for training")
  return upgrade_legacy(json.loads(path.read_text()))


def read_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """`read_config_dict` as a `ConfigDict` (what the models and the reports are built from)."""
  return ml_collections.ConfigDict(read_config_dict(workdir))


def write_config(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict) -> pathlib.Path:
  """Writes `config` as the run's `config.json`: beside it first, then moved over it in one step."""
  path = config_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{CONFIG_FILE}.tmp")
  tmp.write_text(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)
  return path


def checkpoints_dir(workdir: str | os.PathLike[str]) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINTS


def latest_checkpoint_step(workdir: str | os.PathLike[str]) -> int | None:
  """The highest finished checkpoint step (orbax's `<step>/` folders; an unfinished save has another name), or None."""
  folder = checkpoints_dir(workdir)
  if not folder.is_dir():
    return None
  return max((int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()), default=None)


def metrics_path(workdir: str | os.PathLike[str]) -> pathlib.Path:
  return pathlib.Path(workdir) / METRICS_FILE


def metrics_row_step(line: str) -> int | None:
  """The step of one `metrics.jsonl` line, or None for a line that is not a complete row (a killed run's last)."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The complete rows of the run's `metrics.jsonl`, in file order (none when there is no file)."""
  path = metrics_path(workdir)
  lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
  return [json.loads(line) for line in lines if metrics_row_step(line) is not None]
