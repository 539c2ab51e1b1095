"""The three-stage curriculum trainer (Eq. 14-16) with the meta-auxiliary attack."""

from erasablemask_jax.train.state import NetState, TrainState, begin_stage2, create_train_state, make_optimizer
from erasablemask_jax.train.trainer import NonFiniteLossError, Schedule, Trainer, train_and_evaluate
