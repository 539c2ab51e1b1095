"""The immutable train state: every network's variables and optimiser state, the step, the rng and Eq. 11's weights."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from erasablemask_jax.attack import AdaptiveWeights, init_adaptive_weights
from erasablemask_jax.models import ErasableMask, perturbation_encoder_from_generator, restorer_from_generator

NETWORKS = ("g", "e_adv", "r", "d")


@flax.struct.dataclass
class NetState:
  """One network: its parameters, BatchNorm statistics and Adam state."""

  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats} if self.batch_stats else {"params": self.params}


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; a pytree of arrays (checkpointed whole by orbax).

  Attributes:
    step: global step over all stages (the data iterator position is saved beside it).
    rng: the run's root key; a step's randomness is `fold_in(rng, step)`.
    g: G = (G_enc, G_dec), trained in stage 1, frozen after.
    e_adv: the perturbation encoder, trained in stage 2.
    r: the restorer, trained in stages 2 and 3.
    d: the discriminator (D_G and D_att heads), trained in stages 1 and 2.
    adaptive: Eq. 11's surrogate weights and their loss history.
  """

  step: jax.Array
  rng: jax.Array
  g: NetState
  e_adv: NetState
  r: NetState
  d: NetState
  adaptive: AdaptiveWeights


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam as AttGAN (lr 2e-5, betas (0.5, 0.999) in the paper)."""
  return optax.adam(optim_config.lr, b1=optim_config.b1, b2=optim_config.b2)


def _net(variables: dict[str, Any], tx: optax.GradientTransformation) -> NetState:
  return NetState(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                  opt_state=tx.init(variables["params"]))


def create_train_state(models: ErasableMask, tx: optax.GradientTransformation, rng: jax.Array, image_size: int,
                       num_attributes: int, num_surrogates: int) -> TrainState:
  """A fresh state at step 0 (stage 1). Pure: jit it with `out_shardings` to create it already placed."""
  init_rng, run_rng = jax.random.split(rng)
  variables = models.init(init_rng, image_size, num_attributes)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=run_rng,
                    **{name: _net(variables[name], tx) for name in NETWORKS},
                    adaptive=init_adaptive_weights(max(num_surrogates, 1)))


def begin_stage2(state: TrainState, tx: optax.GradientTransformation) -> TrainState:
  """Stage 1 -> 2: E_adv becomes a copy of the trained G_enc and R a copy of G, each with a fresh Adam state.

  R was not trained in stage 1, so `state.r` still holds its initialisation; where R's structure differs from G's
  (`model.r_shortcut_layers`, `model.r_inject_layers`) the leaves whose shapes do not agree with G's keep that fresh
  value and are trained from scratch.
  """
  g_vars = state.g.variables
  return state.replace(e_adv=_net(perturbation_encoder_from_generator(g_vars), tx),
                       r=_net(restorer_from_generator(g_vars, state.r.variables), tx))
