"""ErasableMask's networks: AttGAN encoder/decoder/discriminator and their composition."""

import math

import jax

from erasablemask_jax.models.attgan import AttGAN, Decoder, Discriminator, Encoder, lerp, tile_attributes
from erasablemask_jax.models.erasable import (ErasableMask, perturbation_encoder_from_generator,
                                              restorer_from_generator)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def parameter_counts(config) -> dict[str, int]:
  """Trainable parameter counts (no BatchNorm statistics) of each network for `config`, without allocating them."""
  models = ErasableMask.from_config(config.model, len(config.attributes))
  shapes = models.abstract_variables(config.image_size, len(config.attributes))
  g = shapes["g"]["params"]
  return {
      "G (G_enc + G_dec)": _count(g),
      "G_enc": _count(g["enc"]),
      "G_dec": _count(g["dec"]),
      "E_adv": _count(shapes["e_adv"]["params"]),
      "R (restorer)": _count(shapes["r"]["params"]),
      "D (D_G + D_att)": _count(shapes["d"]["params"]),
  }


__all__ = ["AttGAN", "Decoder", "Discriminator", "Encoder", "ErasableMask", "lerp", "parameter_counts",
           "perturbation_encoder_from_generator", "restorer_from_generator", "tile_attributes"]
