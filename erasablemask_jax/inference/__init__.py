"""The product: protect a folder of faces, and erase the protection again with the trusted authority's restorer.

Modules:
  run: a restored run's jitted protect / restore / attribute-prediction functions and its fingerprint (`load_run`).
  attributes: how `att_b` is chosen (`--attrs` specs) and where `att_a` comes from (attributes.csv or D_att).
  sidecar: the JSON written beside every protected image, and atomic file writes.
  folders: `protect_folder` and `erase_folder`, the library behind `erasablemask protect` / `erase`.
"""

from erasablemask_jax.inference.run import Run
from erasablemask_jax.inference.run import load_run
from erasablemask_jax.inference.run import params_fingerprint
from erasablemask_jax.inference.run import to_model_input
