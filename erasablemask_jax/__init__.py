"""ErasableMask in JAX/Flax.

Erasable, transferable face-privacy perturbations: an AttGAN-based generator with a perturbation encoder trained by a
meta-auxiliary attack against surrogate face-recognition models, and a restorer that erases the perturbation.
"""

__version__ = "0.1.0"
