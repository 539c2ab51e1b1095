"""One place builds a run's jitted steps from a config, a mesh and the surrogates.

`erasablemask train` (`trainer.Trainer`), `erasablemask compile` (ahead of time, for a TPU topology) and the step
benchmark (`benchmarks/step_throughput.py`) all call `build`, so what is compiled for a pod and what is timed is what
trains (MaxText's `train_compile.py` reuses `train.py`'s setup for the same reason).

    built = build(config, mesh, surrogates)
    state = built.init_state()                                   # or restore into built.abstract_state()
    state, metrics = built.step(1)(state, batch)                 # batch: uint8 images, as the data pipeline gives
    state, metrics = built.step(2)(state, batch, fr_vars, targets)

`build` makes the networks (`ErasableMask.from_config`), Adam (`state.make_optimizer`), the attack (`config.attack`),
the training noise pool (`config.noise.train_pool`) and the static `steps.StepConfig`; the shardings: the batch split
over the mesh's `data` axis, the train state as `mesh.state_shardings` places it (replicated, or its large leaves
split over `data` with `mesh.state = "sharded"`), the frozen surrogates' variables and the target embeddings
replicated; and each stage's step jitted with those shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from erasablemask_jax import attack as attack_lib
from erasablemask_jax.config import ConfigError
from erasablemask_jax.fr.preprocess import uint8_to_minus1_1
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import checkpoint as checkpoint_lib
from erasablemask_jax.train import mesh as mesh_lib
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train.state import TrainState, begin_stage2, make_optimizer

STAGE_STEPS = {1: steps_lib.stage1_step, 2: steps_lib.stage2_step, 3: steps_lib.stage3_step}


def extra_args(stage: int, fr_vars, targets) -> tuple:
  """What stage `stage`'s step takes after `(state, batch)`: stage 2 the surrogates' variables and target embeddings
  (the attack), stage 3 the surrogates' variables (L_id, `loss.l_era_id`), stage 1 nothing."""
  return {1: (), 2: (fr_vars, targets), 3: (fr_vars,)}[stage]
BATCH_KEYS = ("image", "att_a", "att_b")


def prepare(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The pipeline's batch (uint8 images, 0/1 attributes) as the steps take it (images in [-1, 1])."""
  return {"image": uint8_to_minus1_1(batch["image"]), "att_a": batch["att_a"], "att_b": batch["att_b"]}


def _with_prepared(step_fn, cfg, state, batch, *args):
  return step_fn(cfg, state, prepare(batch), *args)


def make_noise(members: Sequence[str], jpeg_rounding: str):
  """The training noise pool `config.noise.train_pool` names, or None when it is the identity alone."""
  if not members or tuple(members) == ("identity",):
    return None
  from erasablemask_jax.noise import make_train_pool  # pylint: disable=import-outside-toplevel  (imports JPEG tables)

  return make_train_pool(tuple(members), jpeg_rounding=jpeg_rounding)


def make_step_config(config: ml_collections.ConfigDict, fr_applies: Sequence[Any], *,
                     models: ErasableMask | None = None,
                     tx: optax.GradientTransformation | None = None) -> steps_lib.StepConfig:
  """The static part of every step: networks, optimiser, loss weights, attack, surrogates' apply, noise pool.

  Args:
    config: the run's config.
    fr_applies: each surrogate's `apply(variables, x) -> unit embeddings` (`fr.surrogates.Surrogate.apply`).
    models: replaces `ErasableMask.from_config(config.model, ...)` (a benchmark's bfloat16 variant).
    tx: replaces `make_optimizer(config.optim)` (a benchmark's gradient-capturing chain).

  Raises:
    ConfigError: the meta-auxiliary attack with a single surrogate.
  """
  if config.attack.kind != "ensemble" and len(fr_applies) == 1:
    raise ConfigError("the meta-auxiliary attack needs at least 2 surrogates (fr.surrogates); add one, a '@flip' "
                      "view of one, or set attack.kind='ensemble'")
  models = models or ErasableMask.from_config(config.model, len(config.attributes))
  tx = tx or make_optimizer(config.optim)
  attack = attack_lib.from_config(config.attack, config.loss.epsilon) if fr_applies else None
  return steps_lib.StepConfig(models=models, tx=tx, loss=config.loss, fr_applies=tuple(fr_applies), attack=attack,
                              noise=make_noise(config.noise.train_pool, config.noise.jpeg_rounding))


@dataclasses.dataclass(frozen=True, eq=False)
class Built:
  """A run's jitted steps and the shardings they were jitted with (see the module docstring)."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  step_config: steps_lib.StepConfig
  num_surrogates: int
  state_sharding: Any  # a sharding for every leaf of the train state (a pytree of them, or one for all)
  batch_sharding: NamedSharding
  replicated: NamedSharding
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def models(self) -> ErasableMask:
    return self.step_config.models

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.step_config.tx

  def step(self, stage: int):
    """Stage `stage`'s step, jitted once: `(state, batch, *extra_args(stage, ...)) -> (state, metrics)`, the batch as the
    pipeline gives it (uint8 images), sharded over `data`; the state donated and returned with its own shardings."""
    if stage not in self._jitted:
      extra = (self.replicated,) * len(extra_args(stage, None, None))
      self._jitted[stage] = jax.jit(functools.partial(_with_prepared, STAGE_STEPS[stage], self.step_config),
                                    in_shardings=(self.state_sharding, self.batch_sharding, *extra),
                                    out_shardings=(self.state_sharding, self.replicated), donate_argnums=(0,))
    return self._jitted[stage]

  def init_fn(self):
    """`rng -> TrainState` for this run (`checkpoint.init_fn`)."""
    return checkpoint_lib.init_fn(self.models, self.tx, self.config, self.num_surrogates)

  def init_state(self, rng: jax.Array | None = None) -> TrainState:
    """A fresh state created already placed (default rng: `PRNGKey(config.seed)`)."""
    rng = jax.random.PRNGKey(self.config.seed) if rng is None else rng
    return jax.jit(self.init_fn(), out_shardings=self.state_sharding)(rng)

  def abstract_state(self) -> TrainState:
    """The train state's shapes, dtypes and shardings (an orbax restore target, a compile's argument)."""
    return checkpoint_lib.abstract_state(self.models, self.tx, self.config, self.num_surrogates, self.state_sharding)

  def begin_stage2(self):
    """`state -> state` with E_adv and R copied from G (`state.begin_stage2`), jitted with the state donated."""
    if "begin_stage2" not in self._jitted:
      self._jitted["begin_stage2"] = jax.jit(functools.partial(begin_stage2, tx=self.tx),
                                             out_shardings=self.state_sharding, donate_argnums=(0,))
    return self._jitted["begin_stage2"]

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and sharding, as the pipeline gives it."""
    b, s, a = self.config.data.batch_size, self.config.image_size, len(self.config.attributes)
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), np.uint8, sharding=self.batch_sharding),
            "att_a": jax.ShapeDtypeStruct((b, a), np.float32, sharding=self.batch_sharding),
            "att_b": jax.ShapeDtypeStruct((b, a), np.float32, sharding=self.batch_sharding)}

  def place_replicated(self, tree):
    """`tree` (surrogate variables, target embeddings) on every device of the mesh; abstract leaves get the
    sharding."""
    return jax.tree.map(
        lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated)
                   if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, self.replicated)), tree)


def build(config: ml_collections.ConfigDict, mesh: Mesh, fr_applies: Sequence[Any], *,
          models: ErasableMask | None = None, tx: optax.GradientTransformation | None = None,
          processes: int | None = None) -> Built:
  """A run's steps for `config` on `mesh` against the surrogates whose `apply` functions are `fr_applies`.

  Args:
    config: the run's config.
    mesh: from `mesh.make_mesh` (this process's devices) or a topology's devices (`erasablemask compile`).
    fr_applies: each surrogate's `apply`, in `config.fr.surrogates` order (empty: no attack).
    models, tx: as `make_step_config`.
    processes: the hosts the batch is split over (default: this run's `jax.process_count()`).

  Raises:
    ConfigError: the batch does not divide over the mesh and hosts, or the attack has one surrogate.
  """
  mesh_lib.check_batch_divides(config.data.batch_size, mesh, processes)
  step_config = make_step_config(config, fr_applies, models=models, tx=tx)
  num_surrogates = len(fr_applies)
  shapes = jax.eval_shape(checkpoint_lib.init_fn(step_config.models, step_config.tx, config, num_surrogates),
                          jax.random.PRNGKey(0))
  return Built(config=config, mesh=mesh, step_config=step_config, num_surrogates=num_surrogates,
               state_sharding=mesh_lib.state_shardings(shapes, mesh, config.mesh),
               batch_sharding=NamedSharding(mesh, P(mesh_lib.DATA)), replicated=NamedSharding(mesh, P()))
