"""`train_and_evaluate(config, workdir)`: the three-stage curriculum on one device, many devices or many hosts.

The run is a loop over global steps. The stage of a step follows from the schedule (stage 1, then 2, then 3), so a
run restored from any checkpoint continues exactly: the train state (every network, Adam state, rng, Eq. 11 weights)
and the data iterator's position are saved together by an orbax `CheckpointManager` every
`train.checkpoint_every_steps` steps and at each stage boundary. Orbax writes a checkpoint to a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.

Devices: one `Mesh` with a `data` axis (`train.mesh`); the global batch is sharded along it, the state replicated.
Checkpoints and the abstract state they restore into: `train.checkpoint`.

A first Ctrl-C (SIGINT) on a single-host run stops after the current step, saves it and raises `TrainingInterrupted`
(a second one interrupts at once). A resume drops the rows of `metrics.jsonl` after the restored step, which the
resumed run logs again, so the file keeps one row per logged step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import signal
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from erasablemask_jax import attack as attack_lib
from erasablemask_jax import run_dir
from erasablemask_jax.attack import end_epoch
from erasablemask_jax.config import ConfigError
from erasablemask_jax.data.faces import load_face_splits, read_faces
from erasablemask_jax.data.sources import make_source
from erasablemask_jax.fr import thresholds as thresholds_lib
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.fr.surrogates import Surrogate, load_surrogate, target_embeddings
from erasablemask_jax.image_io import save_image_grid
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import checkpoint as checkpoint_lib
from erasablemask_jax.train import lock as lock_lib
from erasablemask_jax.train import mesh as mesh_lib
from erasablemask_jax.train import resume as resume_lib
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train.state import TrainState, begin_stage2, make_optimizer
from erasablemask_jax.train.writer import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or infinite; the message names the step and the term."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped the run after a step that was then saved; the message says where and how to resume."""

  def __init__(self, step: int, checkpoints: pathlib.Path):
    self.step = step
    super().__init__(f"interrupted: saved a checkpoint at step {step} in {checkpoints}; rerun the same command to "
                     "resume from it")


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


# ---------------------------------------------------------------------------------------------------------------------
# Setup pieces.

def _prepare(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {"image": uint8_to_minus1_1(batch["image"]), "att_a": batch["att_a"], "att_b": batch["att_b"]}


def _with_prepared(step_fn, cfg, state, batch, *args):
  return step_fn(cfg, state, _prepare(batch), *args)


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
    self.mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_divides(config.data.batch_size, self.mesh)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
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
    self.models = ErasableMask.from_config(config.model, len(config.attributes))
    self.tx = make_optimizer(config.optim)

    self.surrogates = surrogates if surrogates is not None else [
        load_surrogate(s, config.fr.input_crop, config.image_size, config.fr.get("fold_batchnorm", False))
        for s in config.fr.surrogates]
    if self.surrogates:
      if target_images is None:
        target_images = self.splits.target if self.splits else read_faces(config.fr.target, config.image_size)
      if len(target_images) == 0:
        raise ConfigError("the attack needs a target face: set fr.target to an image, a folder or 'identity:K'")
      x_t = uint8_to_minus1_1(target_images)
      self.targets = jax.device_put(target_embeddings(self.surrogates, x_t), self.replicated)
      self.fr_vars = jax.device_put([s.variables for s in self.surrogates], self.replicated)
    else:
      self.targets, self.fr_vars = [], []
    if config.attack.kind != "ensemble" and len(self.surrogates) == 1:
      raise ConfigError("the meta-auxiliary attack needs at least 2 surrogates (fr.surrogates); add one, a '@flip' "
                        "view of one, or set attack.kind='ensemble'")
    attack = attack_lib.from_config(config.attack, config.loss.epsilon) if self.surrogates else None
    noise = _make_noise(config.noise.train_pool, config.noise.jpeg_rounding)
    self.step_config = steps_lib.StepConfig(models=self.models, tx=self.tx, loss=config.loss,
                                            fr_applies=tuple(s.apply for s in self.surrogates), attack=attack,
                                            noise=noise)
    self._steps = {}
    self._sample_images = jax.jit(functools.partial(steps_lib.sample_images, self.models))  # traced once per run
    self.checkpoints = checkpoint_lib.checkpoint_manager(
        self.workdir, ocp.CheckpointManagerOptions(max_to_keep=config.train.max_checkpoints_to_keep, create=True))
    self.writer = MetricWriter(self.workdir, enabled=self.is_chief)

  # -------------------------------------------------------------------------------------------------------------------
  def _jit_step(self, stage: int):
    if stage not in self._steps:
      fn = {1: steps_lib.stage1_step, 2: steps_lib.stage2_step, 3: steps_lib.stage3_step}[stage]
      step = functools.partial(_with_prepared, fn, self.step_config)
      n_extra = 2 if stage == 2 else 0
      self._steps[stage] = jax.jit(step, in_shardings=(self.replicated, self.batch_sharding) + (self.replicated,) * n_extra,
                                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
    return self._steps[stage]

  def init_state(self) -> TrainState:
    init = checkpoint_lib.init_fn(self.models, self.tx, self.config, len(self.surrogates))
    return jax.jit(init, out_shardings=self.replicated)(jax.random.PRNGKey(self.config.seed))

  def abstract_state(self) -> TrainState:
    return checkpoint_lib.abstract_state(self.models, self.tx, self.config, len(self.surrogates), self.replicated)

  def restore_or_init(self) -> TrainState:
    step = self.checkpoints.latest_step()
    if step is None:
      return self.init_state()
    restored = self.checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self.abstract_state()), data=ocp.args.JsonRestore()))
    self.source.set_state(restored["data"])
    log.info("restored checkpoint at step %d", step)
    return restored["state"]

  def save(self, state: TrainState, step: int) -> None:
    self.checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(self.source.get_state())), force=True)
    self.checkpoints.wait_until_finished()

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
    state = self.restore_or_init()
    step = int(state.step)
    self.writer.drop_after(step)  # rows a killed run logged after its last checkpoint are logged again
    if self.is_chief:
      self.workdir.mkdir(parents=True, exist_ok=True)
      run_dir.write_config(self.workdir, self.config)
    with _progress(schedule.total, step, self.is_chief) as progress, _stop_on_sigint(jax.process_count() == 1) as stop:
      state = self._loop(state, step, progress, on_step, stop)
    self.checkpoints.wait_until_finished()
    self.writer.close()
    return state

  def _loop(self, state: TrainState, step: int, progress, on_step, stop) -> TrainState:
    """Steps from `step` to the end; when `stop.requested`, saves the last step and raises `TrainingInterrupted`."""
    config, schedule = self.config, self.schedule
    sample_batch = None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    started = time.perf_counter()
    saved = save = True  # the state at entry is a checkpoint's (or the initial one)
    while step < schedule.total:
      if stop.requested:
        if pending:
          self._flush(pending, schedule.stage_of(step - 1), started)
        if not saved:
          self.save(state, step)
        self.writer.close()
        raise TrainingInterrupted(step, self.workdir / "checkpoints")
      stage = schedule.stage_of(step)
      if step == schedule.ends[0] and stage >= 2:
        state = jax.jit(functools.partial(begin_stage2, tx=self.tx), out_shardings=self.replicated,
                        donate_argnums=(0,))(state)
      if stage == 2 and step > schedule.ends[0] and (step - schedule.ends[0]) % schedule.steps_per_epoch == 0:
        state = state.replace(adaptive=jax.jit(end_epoch)(state.adaptive))
      local = next(self.source)
      batch = self.global_batch(local)
      if sample_batch is None:
        sample_batch = {k: v[:config.train.num_sample_images] for k, v in local.items()}
      extra = (self.fr_vars, self.targets) if stage == 2 else ()
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
    batch = _prepare({k: jnp.asarray(v) for k, v in sample_batch.items() if k != "identity"})
    columns = self._sample_images(state, batch)
    save_image_grid(self.workdir / "samples" / f"step_{step:07d}.png",
                    [np.asarray(columns[k]) for k in ("x_cov", "x_edit", "x_adv", "x_rec")])


@contextlib.contextmanager
def _stop_on_sigint(enabled: bool):
  """While the body runs, a first SIGINT sets `.requested` (the loop saves and stops); a second raises at once.

  Only in the main thread of a single-host run: the hosts of a multi-host run would stop at different steps, and
  their collective save would hang.
  """
  stop = types.SimpleNamespace(requested=False)
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield stop
    return

  def request(signum, frame):
    del signum, frame
    if stop.requested:
      raise KeyboardInterrupt
    stop.requested = True
    log.warning("Ctrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once, "
                "without saving)")

  previous = signal.signal(signal.SIGINT, request)
  try:
    yield stop
  finally:
    signal.signal(signal.SIGINT, previous)


def _make_noise(members, jpeg_rounding: str):
  if not members or tuple(members) == ("identity",):
    return None
  from erasablemask_jax.noise import make_train_pool

  return make_train_pool(tuple(members), jpeg_rounding=jpeg_rounding)


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

