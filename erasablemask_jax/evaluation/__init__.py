"""Using a trained run: protect and erase folders of faces, and the paper's evaluation tables.

Modules:
  attributes: how `att_b` is chosen (`--attrs` specs) and where `att_a` comes from (attributes.csv or D_att).
  inference: a restored run's jitted protect / restore / attribute-prediction functions and its fingerprint.
  sidecar: the JSON written beside every protected image, and atomic file writes.
  folders: `protect_folder` and `erase_folder`, the library behind `erasablemask protect` / `erase`.
  report: `evaluate`, Tables II, V and VI (JSON + Markdown) with the embeddings and thresholds used.
  plots: the Fig. 4-style grid, bar plots and the Fig. 5 sweep plots (matplotlib, Agg).
  sweep: the Fig. 5 ablation from several evaluated runs.
"""
