"""A run's checkpoints: the orbax manager of `workdir/checkpoints`, the abstract train state, and `restore_run`.

The one module of `train/` that other packages import: inference restores a trained run through `restore_run`
without building a trainer (no data, no surrogates).
"""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

from erasablemask_jax import run_dir
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train.state import TrainState, create_train_state, make_optimizer

ITEMS = ("state", "data")  # the train state and the data iterator's position, saved together


def checkpoint_manager(workdir: str | os.PathLike[str],
                       options: ocp.CheckpointManagerOptions | None = None) -> ocp.CheckpointManager:
  """The orbax manager of `workdir/checkpoints`."""
  return ocp.CheckpointManager(run_dir.checkpoints_dir(workdir).absolute(), options=options, item_names=ITEMS)


def init_fn(models: ErasableMask, tx, config: ml_collections.ConfigDict, num_surrogates: int):
  """`rng -> TrainState` for the run `config` describes (`state.create_train_state` with its sizes bound)."""
  return functools.partial(create_train_state, models, tx, image_size=config.image_size,
                           num_attributes=len(config.attributes), num_surrogates=num_surrogates)


def abstract_state(models: ErasableMask, tx, config: ml_collections.ConfigDict, num_surrogates: int,
                   sharding: jax.sharding.Sharding) -> TrainState:
  """The train state's shapes and dtypes placed on `sharding`, as an orbax restore wants them; nothing is computed."""
  shapes = jax.eval_shape(init_fn(models, tx, config, num_surrogates), jax.random.PRNGKey(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


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
