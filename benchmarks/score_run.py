"""Scores any trained run with all six real FR models of `../shared/assets`: `python -m benchmarks.score_run RUN`.

The transfer study trains its own runs; this asks the same questions of a run trained elsewhere, the README's demo
above all: on the run's own held-out faces (its `data.eval_identities`) and its own target, protected -> uint8 ->
restored -> uint8 as `protect` / `erase` publish them, what do the bundled foamliu MobileFaceNet, the Xiaoccer
MobileFaceNet (PyTorch) and MobileFace V2 (MXNet) say? Each model gets the run's view (`fr.input_crop` at the run's
image size), with tau1 (FAR 0.01) / tau2 (FAR 0.1) calibrated on that view over the 296 CelebA faces, aligned at the
run's size by our MTCNN. A model the run never attacked is a black box to it (`"whitebox": false` in the JSON).

    erasablemask train --config demo --workdir runs/demo
    python -m benchmarks.score_run runs/demo --out benchmarks/results/demo_real_models.json

Writes `--out`: `{"run", "step", "view", "faces", "calibration": {MODEL: ...}, "metrics": {MODEL: {"asr", "esr",
"irr", "smr", "cos_adv_mean", "cos_adv_ci95", ..., "jpeg50": {...}, "whitebox", "tau1", "tau2"}}, "clean": {MODEL: {"asr",
"cos_target_mean", "cos_target_ci95"}}, "quality",
"machine", "command"}` (rates as fractions), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from benchmarks import results as results_lib
from benchmarks import study_scoring as study


def whitebox_models(specs: dict[str, str], surrogates) -> list[str]:
  """The study's model names the run attacked (a surrogate spec with or without its `@view`)."""
  attacked = {str(s).partition("@")[0] for s in surrogates}
  return [name for name, spec in specs.items() if spec in attacked]


def score(workdir: pathlib.Path, cache: pathlib.Path, max_identities: int = 0, bootstrap: int = 2000,
          seed: int = 0) -> dict:
  """The JSON `main` writes (see the module docstring)."""
  from erasablemask_jax.data.faces import load_face_splits
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  from erasablemask_jax.fr import views
  from erasablemask_jax.inference.run import load_run

  config = load_run(workdir).config
  size = int(config.image_size)
  specs = study.prepare_models()
  faces = load_face_folder_arrays(study.prepare_faces(cache, size, max_identities), size)
  view = views.view_name(config.fr.input_crop, size)
  calibration = study.calibrate_views(study.embed_faces(specs, faces, view), faces["identity"], view)
  splits = load_face_splits(config.data, config.fr, size)
  if len(splits.eval["image"]) == 0:
    raise ValueError(f"{workdir} has no held-out faces (data.eval_identities is empty); score a run that held some out")
  scorer = study.Scorer(specs, config.fr.input_crop, size, splits.target, calibration, config.fr.tau1_far,
                        config.fr.tau2_far, bootstrap, seed)
  whitebox = whitebox_models(specs, config.fr.surrogates)
  entry, _ = study.evaluate_run(workdir, scorer, splits.eval, whitebox)
  clean = {}
  for name in specs:  # the unprotected faces: where protection starts from on each model
    m = scorer.rates(name, splits.eval["image"], splits.eval["image"], None)
    clean[name] = {"asr": m["asr"], "cos_target_mean": m["cos_adv_mean"], "cos_target_ci95": m["cos_adv_ci95"]}
  return {"run": str(workdir), "step": entry["step"], "view": view, "faces": int(len(splits.eval["image"])),
          "surrogates": list(config.fr.surrogates), "whitebox": whitebox, "calibration": calibration,
          "metrics": entry["metrics"], "clean": clean, "quality": entry["quality"]}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir", help="a trained run (erasablemask train --workdir)")
  p.add_argument("--out", default=results_lib.out_path("demo_real_models.json"))
  p.add_argument("--cache", default=str(study.REPO / "runs" / "transfer_study"),
                 help="where the converted FR models and aligned CelebA faces live (shared with the transfer study)")
  p.add_argument("--max-identities", type=int, default=0, help="calibrate on the first N CelebA identities (0: all)")
  p.add_argument("--bootstrap", type=int, default=2000)
  args = p.parse_args(argv)
  if not study.CELEBA.is_dir():
    print(f"error: {study.CELEBA} not found; scoring needs ../shared/assets beside the checkout", file=sys.stderr)
    return 2
  workdir = pathlib.Path(args.workdir)
  load_start = os.getloadavg()
  try:
    result = score(workdir, pathlib.Path(args.cache), args.max_identities, args.bootstrap)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results_lib.write_report(args.out, "score_run", argv, result, load_start)
  print(table(result))
  print(f"wrote {args.out}")
  return 0


def table(result: dict) -> str:
  """Markdown: per FR model, white- or black-box, and the four rates with the cosines behind them."""
  pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
  lines = [f"{result['faces']} held-out faces of {result['run']} (step {result['step']}), view {result['view']}", "",
           "| FR model | box | tau1 | cos(clean, t) | ASR | cos(adv, t) [95% CI] | ESR | IRR | cos(rec, src) | SMR | IRR after JPEG 50 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, m in result["metrics"].items():
    lo, hi = m["cos_adv_ci95"]
    lines.append(f"| {name} | {'white' if m['whitebox'] else 'black'} | {m['tau1']:.3f} | "
                 f"{result['clean'][name]['cos_target_mean']:.3f} | {pct(m['asr'])} | "
                 f"{m['cos_adv_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {pct(m['esr'])} | {pct(m['irr'])} | "
                 f"{m['cos_rec_source_mean']:.3f} | {pct(m['smr'])} | {pct(m['jpeg50']['irr'])} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
