"""Scoring trained runs: the paper's evaluation tables, the Fig. 5 sweep and the figures.

Modules:
  report: `compute_tables`, the paper's Tables II, V and VI with the embeddings and thresholds used; `evaluate` computes
    and writes them.
  render: `write_report`, the report folder (report.json, report.md, figures, embeddings).
  plots: the Fig. 4-style grid, bar plots and the Fig. 5 sweep plots (matplotlib, Agg).
  sweep: the Fig. 5 ablation from several evaluated runs.

Protecting and erasing faces (what a user runs) is `erasablemask_jax.inference`.
"""
