"""Adversarial objectives against surrogate FR models: the meta-auxiliary attack (Eq. 9-12), its first-order variant,
the ensemble ablation, and the adaptive weights of Eq. 11."""

from erasablemask_jax.attack.adaptive_weights import AdaptiveWeights
from erasablemask_jax.attack.adaptive_weights import accumulate
from erasablemask_jax.attack.adaptive_weights import end_epoch
from erasablemask_jax.attack.adaptive_weights import init_adaptive_weights
from erasablemask_jax.attack.adaptive_weights import weights_from_history
from erasablemask_jax.attack.meta_auxiliary import KINDS
from erasablemask_jax.attack.meta_auxiliary import PRIMARIES
from erasablemask_jax.attack.meta_auxiliary import attack_loss
from erasablemask_jax.attack.meta_auxiliary import ensemble_value_and_grad
from erasablemask_jax.attack.meta_auxiliary import from_config
from erasablemask_jax.attack.meta_auxiliary import inner_update
from erasablemask_jax.attack.meta_auxiliary import make_attack
from erasablemask_jax.attack.meta_auxiliary import meta_auxiliary_loss_nested
from erasablemask_jax.attack.meta_auxiliary import meta_auxiliary_value_and_grad
