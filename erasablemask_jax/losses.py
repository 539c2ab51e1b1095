"""ErasableMask's losses (paper Eq. 3, 4, 5, 8 and 13) as pure functions.

Conventions (SPEC.md): discriminator outputs are logits and every binary cross-entropy is taken on logits; images are
in [-1, 1]; every loss is a mean over the batch. The attack losses of Eq. 9-12 live in `erasablemask_jax.attack`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def discriminator_adversarial_loss(real_logits: Array, fake_logits: Array) -> Array:
  """Eq. 3, discriminator side: `L_D = -log D_G(x_cov) - log(1 - D_G(x_adv))`, batch mean.

  The caller passes fakes that are already `stop_gradient`-ed (the generator is not updated by `L_D`).

  Args:
    real_logits: `(B,)` D_G logits of real images.
    fake_logits: `(B,)` D_G logits of generated images.
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits))
                  + optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: Array) -> Array:
  """Eq. 3, generator side (non-saturating): `L_G = -log D_G(x_adv)`, batch mean."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits)))


def attribute_loss(att_logits: Array, labels: Array) -> Array:
  """Eq. 4: `BCE(D_att(x), att)`, the mean over the attributes and the batch.

  The mean is AttGAN's code convention, the scale its weights `lambda = 10` (G) and `1` (D) were tuned for; the paper
  writes a sum over the attributes, which would make both terms `A` (13) times AttGAN's strength (SPEC.md, Eq. 4).
  `L_att^D` uses real images with their source labels `att_a`; `L_att^G` uses generated images with the target labels
  `att_b`.

  Args:
    att_logits: `(B, A)` D_att logits.
    labels: `(B, A)` 0/1 attribute labels.
  """
  return jnp.mean(optax.sigmoid_binary_cross_entropy(att_logits, labels))


def reconstruction_loss(x_reconstructed: Array, x: Array) -> Array:
  """Eq. 5: `L_rec = |G_dec(G_enc(x_cov), att_a) - x_cov|_1`.

  Taken as the mean absolute error over all pixels (AttGAN's `F.l1_loss`), the scale the paper's weight
  `lambda_rec = 150` was tuned for.
  """
  return jnp.mean(jnp.abs(x_reconstructed - x))


def _per_image_l2(a: Array, b: Array) -> Array:
  diff = (a - b).reshape(a.shape[0], -1)
  return optax.safe_norm(diff, 0.0, axis=-1)  # gradient defined (zero) where the images are equal


def perturbation_loss(x_adv: Array, x_edit: Array, sigma1: float) -> Array:
  """Eq. 8: `L_perb = max(sigma1, ||x_adv - x_cov^{att_b}||_2)` per image, batch mean.

  The L2 norm is over all pixels of an image in [-1, 1]; below `sigma1` the loss is flat (no gradient), so only
  perturbations larger than `sigma1` are penalised.

  Args:
    x_adv: `(B, H, W, 3)` protected images.
    x_edit: `(B, H, W, 3)` the clean attribute edit `G_dec(G_enc(x_cov), att_b)`.
    sigma1: the hinge (30 in the paper).
  """
  return jnp.mean(jnp.maximum(sigma1, _per_image_l2(x_adv, x_edit)))


def erasure_loss(x_restored: Array, x: Array) -> Array:
  """Eq. 13: `L_era = ||R(x_adv, att_a) - x_cov||_2` per image, batch mean."""
  return jnp.mean(_per_image_l2(x_restored, x))


def scaled_sigma1(sigma1: float, image_size: int, reference_size: int) -> float:
  """Eq. 8's hinge at `image_size`: `sigma1 * image_size / reference_size` (SPEC.md: sigma1 = 30 is the budget at
  256x256, the same per-pixel RMS `30 / sqrt(256 * 256 * 3) = 0.068` at every size, so 15 at 128x128). A
  `reference_size` of 0 uses `sigma1` as it is (runs saved before the rule)."""
  return sigma1 * image_size / reference_size if reference_size else sigma1


def identity_erasure_loss(e_restored: Sequence[Array], e_source: Sequence[Array]) -> Array:
  """`L_id = mean_k (1 - mean_b cos(FR_k(x_rec), FR_k(x_cov)))` over the surrogates (not in the paper).

  Eq. 13 weighs every pixel of the residual `R(x_adv) - x_cov` alike; the part of the perturbation that R leaves is
  small in L2 but is what still moves the FR models toward the target (ESR). This term asks R for the source's
  identity in the surrogates' embedding space, where a perfect restorer's output scores the clean face's ESR.

  Args:
    e_restored: per surrogate, `(B, D)` L2-normalised embeddings of the restored faces.
    e_source: per surrogate, `(B, D)` L2-normalised embeddings of the source faces (constants).
  """
  return jnp.mean(jnp.stack([1.0 - jnp.mean(jnp.sum(r * s, axis=-1)) for r, s in zip(e_restored, e_source)]))
