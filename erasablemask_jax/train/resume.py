"""Resuming a workdir under a changed config: `check_resume_config` refuses it unless the change is safe and allowed.

A workdir's `config.json` describes the run in it, and the trainer rewrites it with the config of each (re)start. A
changed architecture would only fail later inside orbax's restore; any other silent change leaves a `config.json` that
no longer describes the checkpoints. So a resume compares the saved config with the new one, key by key:

- architecture (`model.*`, `image_size`, `attributes`, `fr.surrogates`): the checkpoint cannot be restored; always
  refused, a new workdir is needed;
- safe, accepted with `allow_changes` (`erasablemask train --allow-config-change`): `train.*` (logging, sample and
  checkpoint cadence), `mesh.*` (the device layout; the state is replicated and the global batch unchanged), and
  schedule counts that lengthen a stage that has not finished at the checkpoint (a finished stage cannot grow: its
  steps would be rerun on a state that has moved on);
- report-only (`fr.threshold_source`, `fr.tau1_far`, `fr.tau2_far`: which thresholds the closing report uses;
  `fr.report_models`: which models it scores besides the surrogates; a run saved before such a key existed has
  none): accepted without asking;
- numerics-only (`fr.fold_batchnorm`: the same surrogate networks computed another way, equal up to float rounding;
  runs saved before it existed computed them unfolded): accepted without asking, logged; the steps after such a change
  are no longer bit-identical to an uninterrupted run's;
- everything else (losses, optimiser, attack, data, noise, seed, ...) changes what the remaining steps train, so the
  run would no longer be the one its config describes: refused; train it in a new (or copied) workdir.

The check belongs to entry points (`erasablemask train`, `train_and_evaluate`), not to `Trainer`: scripts that
deliberately continue a copied workdir under another config (a finished stage 1 reused with a different attack) skip
it with `train_and_evaluate(..., check_config=False)`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any

import ml_collections

from erasablemask_jax import run_dir
from erasablemask_jax.config import ConfigError
from erasablemask_jax.run_dir import CONFIG_FILE
from erasablemask_jax.run_dir import latest_checkpoint_step
ARCHITECTURE_KEYS = ("model", "image_size", "attributes", "fr.surrogates")
SAFE_KEYS = ("train", "mesh")
REPORT_KEYS = ("fr.threshold_source", "fr.tau1_far", "fr.tau2_far", "fr.report_models")
NUMERICS_KEYS = ("fr.fold_batchnorm",)
_ABSENT = "(absent)"

log = logging.getLogger(__name__)


class ConfigChangeError(ConfigError):
  """The config differs from the one a workdir was trained with; the message lists the keys."""


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (saved value, current value)}` of every leaf that differs, `"(absent)"` for a missing side."""
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  pairs = {k: (flat_saved.get(k, _ABSENT), flat_current.get(k, _ABSENT)) for k in flat_saved.keys() | flat_current}
  return {k: pair for k, pair in sorted(pairs.items()) if pair[0] != pair[1]}


def check_resume_config(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                        allow_changes: bool = False) -> dict[str, tuple[Any, Any]]:
  """Refuses to resume `workdir` under `config` when it differs from the saved `config.json` (module docstring).

  A workdir without a checkpoint is not a resume: anything goes (the trainer starts afresh).

  Args:
    workdir: the training run's directory.
    config: the config about to be trained.
    allow_changes: accept the safe changes (train.*, mesh.*, lengthening unfinished stages).

  Returns:
    The accepted changes, `{key: (saved, current)}` (empty when nothing changed or nothing is resumed).

  Raises:
    ConfigChangeError: one line naming every refused key, its two values and, for an unsafe one, why.
  """
  workdir = pathlib.Path(workdir)
  step = latest_checkpoint_step(workdir)
  if step is None or not (workdir / CONFIG_FILE).is_file():
    return {}
  try:
    saved = run_dir.read_config_dict(workdir)
  except json.JSONDecodeError as e:
    raise ConfigChangeError(f"{workdir / CONFIG_FILE} is not valid JSON ({e}), so the config this run was trained "
                            "with is unknown; restore the file or train in a new --workdir") from None
  current = json.loads(config.to_json_best_effort())
  changes = config_changes(saved, current)
  problems = {k: _problem(k, saved, current, step, workdir) for k in changes}
  refused = {k: why for k, why in problems.items()
             if why is not None or not (allow_changes or _under(k, REPORT_KEYS + NUMERICS_KEYS))}
  if refused:
    listed = ", ".join(f"{k} {_short(changes[k][0])} -> {_short(changes[k][1])}" + (f" ({why})" if why else "")
                       for k, why in refused.items())
    if all(why is None for why in refused.values()):
      advice = "pass --allow-config-change to resume with them (these changes are safe)"
    else:
      advice = "resume with the saved config, or train in a new --workdir"
    raise ConfigChangeError(f"{workdir} was trained to step {step} with another config (its {CONFIG_FILE}); "
                            f"changed: {listed}; {advice}")
  if changes:
    log.warning("resuming %s at step %d with changed config keys: %s", workdir, step,
                ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items()))
  return changes


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _under(key: str, groups: tuple[str, ...]) -> bool:
  return any(key == g or key.startswith(g + ".") for g in groups)


def _problem(key: str, saved: dict[str, Any], current: dict[str, Any], step: int, workdir: pathlib.Path) -> str | None:
  """Why changing `key` is unsafe, or None for a safe change."""
  if _under(key, ARCHITECTURE_KEYS):
    return "the architecture: the checkpoint cannot be restored into it"
  if _under(key, SAFE_KEYS + REPORT_KEYS + NUMERICS_KEYS):
    return None
  stage = re.fullmatch(r"schedule\.stage([123])_(steps|epochs)", key)
  if stage:
    try:
      return _schedule_problem(int(stage[1]), saved["schedule"], current["schedule"], step, workdir)
    except KeyError:  # a count missing on one side: nothing to compare
      pass
  return "changes what the remaining steps train"


def _stage_length(schedule: dict[str, Any], stage: int) -> tuple[str, int]:
  """`("steps", n)` or `("epochs", n)`, as `trainer.Schedule` reads a stage's length."""
  steps = schedule[f"stage{stage}_steps"]
  return ("steps", steps) if steps >= 0 else ("epochs", schedule[f"stage{stage}_epochs"])


def _schedule_problem(stage: int, saved: dict[str, Any], current: dict[str, Any], step: int,
                      workdir: pathlib.Path) -> str | None:
  old, new = _stage_length(saved, stage), _stage_length(current, stage)
  if old == new:
    return None  # the count that is not in use changed
  if old[0] != new[0]:
    return f"switches stage {stage} between a step count and an epoch count"
  if new[1] < old[1]:
    return f"shortens stage {stage}"
  last = _stage_of_last_step(saved, step, workdir)
  if last is None:
    return (f"cannot tell whether stage {stage} has finished: the stages are counted in epochs and "
            f"metrics.jsonl has no entry for step {step}")
  if last > stage:
    return f"stage {stage} finished before the checkpoint at step {step}"
  return None


def _stage_of_last_step(schedule: dict[str, Any], step: int, workdir: pathlib.Path) -> int | None:
  """The stage of the checkpoint's last step (`step - 1`), from the saved schedule or else the metrics log."""
  lengths = [_stage_length(schedule, s) for s in (1, 2)]
  if all(unit == "steps" for unit, _ in lengths):
    end1 = lengths[0][1]
    return 1 + (step > end1) + (step > end1 + lengths[1][1])
  # Epoch counts need the data's steps per epoch; but the trainer logs the stage of every step it checkpoints.
  stages = [entry["stage"] for entry in run_dir.read_metrics(workdir) if entry.get("step") == step and "stage" in entry]
  return int(stages[-1]) if stages else None


def _short(value: Any) -> str:
  text = value if value == _ABSENT else json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."
