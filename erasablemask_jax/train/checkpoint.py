"""A run's checkpoints: the orbax manager of `workdir/checkpoints`, the abstract train state, `restore_newest_intact`
and `restore_run`.

The one module of `train/` that other packages import: inference restores a trained run through `restore_run`
without building a trainer (no data, no surrogates).
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import sys
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp

from erasablemask_jax import run_dir
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train.state import TrainState, create_train_state, make_optimizer

ITEMS = ("state", "data")  # the train state and the data iterator's position, saved together
DAMAGED_SUFFIX = ".damaged"  # a damaged step's folder is renamed `<step>.damaged`, which orbax does not list

log = logging.getLogger(__name__)


class DamagedCheckpointError(RuntimeError):
  """No checkpoint of a run reads back; the message names each damaged step and what to do."""


def checkpoint_manager(workdir: str | os.PathLike[str],
                       options: ocp.CheckpointManagerOptions | None = None) -> ocp.CheckpointManager:
  """The orbax manager of `workdir/checkpoints`."""
  return ocp.CheckpointManager(run_dir.checkpoints_dir(workdir).absolute(), options=options, item_names=ITEMS)


def restore_newest_intact(manager: ocp.CheckpointManager, args, *, set_aside: bool = True):
  """`(step, restored)` from the newest checkpoint that reads back, or `(None, None)` when there is none.

  A checkpoint with a truncated or missing file (as a disk that filled up, or a copy cut short, leaves) fails to
  restore; the next older one is tried, and once one restores, each damaged newer one is renamed `<step>.damaged`
  (nothing is deleted) so that the resumed run can save those steps again. Each is named in a warning.

  Args:
    manager: the run's checkpoint manager.
    args: the restore arguments (`ocp.args.Composite`).
    set_aside: rename the damaged steps (False on all hosts of a multi-host run but the first, which share the files).

  Raises:
    DamagedCheckpointError: checkpoints exist but none reads back; nothing was renamed.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore, json and orbax each raise their own kind
      ignore_late_io_callbacks()
      damaged.append((step, error_summary(e)))
      log.warning("the checkpoint at step %d in %s does not read back (%s); trying the one before", step,
                  manager.directory, damaged[-1][1])
      continue
    for bad, why in damaged:
      folder = pathlib.Path(manager.directory) / str(bad)
      aside = _free_name(folder) if set_aside else folder.with_name(folder.name + DAMAGED_SUFFIX)
      if set_aside:
        folder.rename(aside)
      log.warning("the checkpoint at step %d is damaged (%s): resuming from step %d, the newest intact one; the "
                  "damaged one is kept as %s", bad, why, step, aside)
    return step, restored
  if damaged:
    listed = "; ".join(f"step {step}: {why}" for step, why in damaged)
    raise DamagedCheckpointError(
        f"no checkpoint in {manager.directory} reads back ({listed}); put back intact copies of these folders, or "
        "train from step 0 in a new --workdir (this one is left as it is)")
  return None, None


def ignore_late_io_callbacks() -> None:
  """After a failed save or restore, stops the traceback of each of its late tensorstore callbacks.

  Orbax runs tensorstore's reads and writes on an asyncio loop that it closes once one of them fails; the others,
  finishing later, call back into the closed loop, and each such `RuntimeError: Event loop is closed` reaches
  `sys.excepthook` from a tensorstore thread, with a traceback that says nothing about the run. Other errors pass.
  """
  previous = sys.excepthook
  if getattr(previous, "ignores_late_io_callbacks", False):
    return

  def late(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

  def hook(kind, value, traceback):
    if not late(value):
      previous(kind, value, traceback)

  previous_unraisable, previous_thread = sys.unraisablehook, threading.excepthook

  def unraisable(info):
    if not late(info.exc_value):
      previous_unraisable(info)

  def thread_hook(args):
    if not late(args.exc_value):
      previous_thread(args)

  hook.ignores_late_io_callbacks = True
  sys.excepthook, sys.unraisablehook, threading.excepthook = hook, unraisable, thread_hook


def _free_name(folder: pathlib.Path) -> pathlib.Path:
  aside, n = folder.with_name(folder.name + DAMAGED_SUFFIX), 1
  while aside.exists():
    n += 1
    aside = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}{n}")
  return aside


def error_summary(error: BaseException, limit: int = 200) -> str:
  """`Type: message` on one line, cut to `limit` characters (tensorstore's messages run to pages)."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: " + (text if len(text) <= limit else text[:limit - 3] + "...")


def init_fn(models: ErasableMask, tx, config: ml_collections.ConfigDict, num_surrogates: int):
  """`rng -> TrainState` for the run `config` describes (`state.create_train_state` with its sizes bound)."""
  return functools.partial(create_train_state, models, tx, image_size=config.image_size,
                           num_attributes=len(config.attributes), num_surrogates=num_surrogates)


def abstract_state(models: ErasableMask, tx, config: ml_collections.ConfigDict, num_surrogates: int,
                   sharding) -> TrainState:
  """The train state's shapes and dtypes placed on `sharding` (one for every leaf, or a pytree of them), as an orbax
  restore or an ahead-of-time compile wants them; nothing is computed."""
  shapes = jax.eval_shape(init_fn(models, tx, config, num_surrogates), jax.random.PRNGKey(0))
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def restore_run(workdir: str | os.PathLike[str], step: int | None = None):
  """A trained run for inference: `(config, models, state, step)` from `workdir` (its `config.json` and checkpoints).

  Only the train state is read (no data, no surrogates); the state's arrays land on the default device.

  Raises:
    FileNotFoundError: `workdir` holds no config.json or no checkpoint.
  """
  workdir = pathlib.Path(workdir)
  config = run_dir.read_config(workdir)
  manager = checkpoint_manager(workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
  models = ErasableMask.from_config(config.model, len(config.attributes))
  abstract = abstract_state(models, make_optimizer(config.optim), config, len(config.fr.surrogates),
                            jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  return config, models, state, step
