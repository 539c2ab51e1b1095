"""`train_and_evaluate(config, workdir)`: the three-stage curriculum on one device, many devices or many hosts.

The run is a loop over global steps. The stage of a step follows from the schedule (stage 1, then 2, then 3), so a
run restored from any checkpoint continues exactly: the train state (every network, Adam state, rng, Eq. 11 weights)
and the data iterator's position are saved together by an orbax `CheckpointManager` every
`train.checkpoint_every_steps` steps and at each stage boundary. Orbax writes a checkpoint to a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.

Devices: one `Mesh` with a `data` axis (`train.mesh`); the global batch is sharded along it, the state replicated or
sharded (`mesh.state`). The jitted steps, their shardings and the state's layout come from `train.build`, which
`erasablemask compile` and the step benchmark call too.
Checkpoints and the abstract state they restore into: `train.checkpoint`.

A first Ctrl-C (SIGINT) or SIGTERM stops the run after a step (on several hosts, the same step on every host), saves
it and raises `TrainingInterrupted` (a second signal stops at once); a lost host raises `HostLostError`, a save that
the file system refuses `CheckpointSaveError`, each saying which checkpoint to resume from (`train.preemption`). A
resume starts from the newest checkpoint that reads back (`checkpoint.restore_newest_intact`) and drops the rows of
`metrics.jsonl` after it, which the resumed run logs again, so the file keeps one row per logged step.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from erasablemask_jax import run_dir
from erasablemask_jax.attack import end_epoch
from erasablemask_jax.config import ConfigError
from erasablemask_jax.data.faces import load_face_splits, read_faces
from erasablemask_jax.data.sources import make_source
from erasablemask_jax.fr import thresholds as thresholds_lib
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.fr.surrogates import Surrogate, load_surrogate, target_embeddings
from erasablemask_jax.image_io import save_image_grid
from erasablemask_jax.train import build as build_lib
from erasablemask_jax.train import checkpoint as checkpoint_lib
from erasablemask_jax.train import lock as lock_lib
from erasablemask_jax.train import mesh as mesh_lib
from erasablemask_jax.train import preemption
from erasablemask_jax.train import resume as resume_lib
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train.preemption import CheckpointSaveError, HostLostError, TrainingInterrupted  # noqa: F401
from erasablemask_jax.train.state import TrainState
from erasablemask_jax.train.writer import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or infinite; the message names the step and the term."""


# ---------------------------------------------------------------------------------------------------------------------
# Schedule.

class Schedule:
  """Stage lengths in steps: `*_steps` when >= 0 (0 skips the stage), else `*_epochs * steps_per_epoch`."""

  def __init__(self, schedule_config, steps_per_epoch: int):
    self.steps_per_epoch = steps_per_epoch
    self.lengths = []
    for stage in (1, 2, 3):
      steps = schedule_config[f"stage{stage}_steps"]
      self.lengths.append(steps if steps >= 0 else schedule_config[f"stage{stage}_epochs"] * steps_per_epoch)
    self.ends = list(np.cumsum(self.lengths))

  @property
  def total(self) -> int:
    return int(self.ends[-1])

  def stage_of(self, step: int) -> int:
    """The stage that step `step` (0-based, the step about to run) belongs to."""
    return 1 + sum(step >= end for end in self.ends[:-1])

  def is_boundary(self, step: int) -> bool:
    """True after the last step of a stage (`step` counts completed steps)."""
    return step in self.ends


class Trainer:
  """Holds the jitted steps, the checkpoint manager and the writers of one run.

  It neither locks the workdir nor compares its saved config: the entry points do (`train_and_evaluate`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
               source: Iterator | None = None, surrogates: list[Surrogate] | None = None,
               target_images: np.ndarray | None = None):
    self.config = config
    if config.fr.get("threshold_source", "calibrated") not in thresholds_lib.THRESHOLD_SOURCES:  # not at the report
      raise ConfigError(f"fr.threshold_source={config.fr.threshold_source!r}; choose one of "
                        f"{thresholds_lib.THRESHOLD_SOURCES}")
    self.workdir = pathlib.Path(workdir)
    self.is_chief = jax.process_index() == 0

    self.splits = None
    if source is None or (config.fr.surrogates and target_images is None and surrogates is None):
      if not config.data.data_dir:
        self.splits = load_face_splits(config.data, config.fr, config.image_size)
    if source is None:
      source = make_source(config, jax.process_index(), jax.process_count(),
                           self.splits.train if self.splits else None)
    self.source = source
    self.schedule = Schedule(config.schedule, self.source.steps_per_epoch)

    self.surrogates = surrogates if surrogates is not None else [
        load_surrogate(s, config.fr.input_crop, config.image_size, config.fr.get("fold_batchnorm", False))
        for s in config.fr.surrogates]
    self.built = build_lib.build(config, mesh_lib.make_mesh(config.mesh), [s.apply for s in self.surrogates])
    self.mesh, self.models, self.tx = self.built.mesh, self.built.models, self.built.tx
    self.step_config, self.replicated, self.batch_sharding = (self.built.step_config, self.built.replicated,
                                                              self.built.batch_sharding)
    if self.surrogates:
      if target_images is None:
        target_images = self.splits.target if self.splits else read_faces(config.fr.target, config.image_size)
      if len(target_images) == 0:
        raise ConfigError("the attack needs a target face: set fr.target to an image, a folder or 'identity:K'")
      self.target_images = np.asarray(target_images)  # the closing report's black boxes embed them too
      x_t = uint8_to_minus1_1(target_images)
      self.targets = self.built.place_replicated(target_embeddings(self.surrogates, x_t))
      self.fr_vars = self.built.place_replicated([s.variables for s in self.surrogates])
    else:
      self.targets, self.fr_vars, self.target_images = [], [], None
    self._sample_images = jax.jit(functools.partial(steps_lib.sample_images, self.models))  # traced once per run
    self.checkpoints = checkpoint_lib.checkpoint_manager(
        self.workdir, ocp.CheckpointManagerOptions(max_to_keep=config.train.max_checkpoints_to_keep, create=True))
    self.writer = MetricWriter(self.workdir, enabled=self.is_chief)

  # -------------------------------------------------------------------------------------------------------------------
  def _jit_step(self, stage: int):
    return self.built.step(stage)

  def init_state(self) -> TrainState:
    return self.built.init_state()

  def abstract_state(self) -> TrainState:
    return self.built.abstract_state()

  def restore_or_init(self) -> TrainState:
    """The newest checkpoint that reads back (damaged newer ones are set aside), else the initial state."""
    step, restored = checkpoint_lib.restore_newest_intact(self.checkpoints, ocp.args.Composite(
        state=ocp.args.StandardRestore(self.abstract_state()), data=ocp.args.JsonRestore()), set_aside=self.is_chief)
    if step is None:
      return self.init_state()
    if self.checkpoints.latest_step() != step:  # newer damaged steps were set aside: list the folder again
      if jax.process_count() > 1:  # the first host renamed them
        multihost_utils.sync_global_devices("damaged checkpoints set aside")
      self.checkpoints.reload()
    self.source.set_state(restored["data"])
    log.info("restored checkpoint at step %d", step)
    return restored["state"]

  def save(self, state: TrainState, step: int) -> None:
    """Saves `step` and waits until it is complete; a file system that refuses it raises `CheckpointSaveError`."""
    last = self.checkpoints.latest_step()
    try:
      with preemption.file_system_errors_in_one_line():
        self.checkpoints.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(self.source.get_state())), force=True)
        self.checkpoints.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = preemption.save_error(e, step, self.workdir / "checkpoints", last)
      if error is None:
        raise
      raise error from e

  def report_faces(self) -> dict[str, Any]:
    """The closing report's faces: `{"images", "att_a", "split"}`, the held-out split when there is one, else the
    first training batch (`report.whitebox_report`'s arguments)."""
    if self.splits is not None and len(self.splits.eval["image"]) > 0:
      return {"images": self.splits.eval["image"], "att_a": self.splits.eval["att"], "split": "held-out"}
    batch = next(self.source)
    return {"images": batch["image"], "att_a": batch["att_a"], "split": "training batch"}

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items() if k in ("image", "att_a", "att_b")}

  # -------------------------------------------------------------------------------------------------------------------
  def run(self, on_step=None) -> TrainState:
    """Trains to the end of stage 3 from wherever the workdir's latest checkpoint left off.

    Args:
      on_step: optional `callback(step)` after each completed (and, when due, saved) step.
    """
    schedule = self.schedule
    multihost = jax.process_count() > 1
    with preemption.stop_when_a_host_is_lost(self.checkpoints, self.workdir / "checkpoints", multihost):
      state = self.restore_or_init()
      step = int(state.step)
      self.writer.drop_after(step)  # rows a killed run logged after its last checkpoint are logged again
      if self.is_chief:
        self.workdir.mkdir(parents=True, exist_ok=True)
        run_dir.write_config(self.workdir, self.config)
      with (_progress(schedule.total, step, self.is_chief) as progress,
            preemption.stop_on_signals(self.checkpoints, multihost) as stop):
        state = self._loop(state, step, progress, on_step, stop)
      self.checkpoints.wait_until_finished()
    self.writer.close()
    return state

  def _loop(self, state: TrainState, step: int, progress, on_step, stop) -> TrainState:
    """Steps from `step` to the end; when `stop.due()`, saves the last step and raises `TrainingInterrupted`."""
    config, schedule = self.config, self.schedule
    sample_batch = None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    started = time.perf_counter()
    saved = self.checkpoints.latest_step() == step  # the state at entry is this checkpoint's (or the initial one)
    while step < schedule.total:
      if stop.due():
        if pending:
          self._flush(pending, schedule.stage_of(step - 1), started)
        if not saved:
          self.save(state, step)
        self.writer.close()
        raise TrainingInterrupted(step, self.workdir / "checkpoints", stop.signum, jax.process_count())
      stage = schedule.stage_of(step)
      if step == schedule.ends[0] and stage >= 2:
        state = self.built.begin_stage2()(state)
      if stage == 2 and step > schedule.ends[0] and (step - schedule.ends[0]) % schedule.steps_per_epoch == 0:
        state = state.replace(adaptive=jax.jit(end_epoch)(state.adaptive))
      local = next(self.source)
      batch = self.global_batch(local)
      if sample_batch is None:
        sample_batch = {k: v[:config.train.num_sample_images] for k, v in local.items()}
      extra = build_lib.extra_args(stage, self.fr_vars, self.targets)
      state, metrics = self._jit_step(stage)(state, batch, *extra)
      step += 1
      pending.append((step, metrics))
      boundary = schedule.is_boundary(step)
      save = boundary or step % config.train.checkpoint_every_steps == 0
      if save or step % config.train.log_every_steps == 0:
        self._flush(pending, stage, started)
        pending = []
      if save:
        self.save(state, step)
      if self.is_chief and (boundary or step % config.train.sample_every_steps == 0):
        self._write_samples(state, sample_batch, step)
      progress.update(1)
      saved = save
      if on_step is not None:
        on_step(step)
    return state

  def _flush(self, pending, stage: int, started: float) -> None:
    """Checks every pending step's losses are finite, then logs their mean."""
    host = jax.device_get(pending)
    for step, metrics in host:
      for name, value in metrics.items():
        if not np.all(np.isfinite(value)):
          last = self.checkpoints.latest_step()
          raise NonFiniteLossError(
              f"non-finite loss at step {step} (stage {stage}): {name} = {value}. The last good checkpoint "
              f"({'none' if last is None else f'step {last}'}) in {self.workdir / 'checkpoints'} is kept; lower "
              f"optim.lr or check the data, then rerun the same command to resume from it.")
    means = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
    means["stage"] = stage
    means["elapsed_s"] = time.perf_counter() - started
    self.writer.write(host[-1][0], means)

  def _write_samples(self, state: TrainState, sample_batch, step: int) -> None:
    batch = build_lib.prepare({k: jnp.asarray(v) for k, v in sample_batch.items() if k != "identity"})
    columns = self._sample_images(state, batch)
    save_image_grid(self.workdir / "samples" / f"step_{step:07d}.png",
                    [np.asarray(columns[k]) for k in ("x_cov", "x_edit", "x_adv", "x_rec")])




def _progress(total: int, initial: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *, check_config: bool = True,
                       allow_config_change: bool = False, **kwargs) -> TrainState:
  """Runs (or resumes) the whole curriculum in `workdir`; returns the final state.

  As `erasablemask train` does, it holds the workdir's lock (`lock.workdir_lock`: a second run raises
  `WorkdirBusyError`) and, on a resume, refuses a config that differs from the saved one (`resume.check_resume_config`;
  `allow_config_change=True` accepts the safe changes). A script that deliberately continues a copied workdir under
  another config passes `check_config=False`; an architecture change then fails in the checkpoint restore.
  """
  with lock_lib.workdir_lock(workdir, enabled=jax.process_index() == 0):
    if check_config:
      resume_lib.check_resume_config(workdir, config, allow_config_change)
    return Trainer(config, workdir, **kwargs).run()


def params_of(state: TrainState) -> dict[str, Any]:
  """Every network's parameters and statistics as host numpy arrays (for comparisons and exports)."""
  return jax.device_get({name: {"params": getattr(state, name).params, "batch_stats": getattr(state, name).batch_stats}
                         for name in ("g", "e_adv", "r", "d")})

