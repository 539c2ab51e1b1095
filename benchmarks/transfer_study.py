"""Black-box transfer, erasure and identity recovery on six real FR models: `python -m benchmarks.transfer_study`.

The study the paper's Table II / VII rows stand for, at the scale of a 2-core CPU (`configs/transfer_study.py` holds
every departure from the paper, each with its reason). Six real FR models in three formats (`study_scoring.MODELS`):
foamliu and Xiaoccer MobileFaceNets (PyTorch), becauseofAI MobileFace V2 (MXNet) and V3 (TF.js), and HSE's faceres and
faceres-deep (TF.js; one MobileNet-v1 network, another family than the other four), loaded as `fr.real_models`' `shared:`
models.

1. data, models, thresholds: `benchmarks/study_scoring.py` (296 CelebA photos of 74 identities aligned to loose 128
   crops, split by identity: one target identity, `--eval-identities` (12) held out, the rest trains; each model's
   thresholds calibrated on the view it gets);
2. folds (`FOLDS`): three surrogates white-box (K = 3, the paper's count), the other three models black boxes. A fold is
   named after its MobileFaceNet-family black box, so every fold has a different one; faceres and faceres-deep are
   black boxes of every fold (never surrogate and black box of one fold, being one network), so every fold is judged
   by a family that none of its surrogates belongs to;
3. stage 1 once (it has no attack); per fold and attack kind (meta_auxiliary, first_order, ensemble) stage 2 once;
   per variant (`VARIANTS`: the study's setting, and the rows that show what each departure from the paper buys)
   stage 3 from a copy of the stage-2 run that variant shares, or stage 2 again where the variant changes it;
4. scoring per run (`study_scoring`): ASR / ESR / IRR / SMR and cosines with bootstrap CIs on every model, LPIPS and
   L1 / MSE of both outputs, a face grid per run, and the diagnosis that `--diagnose` prints; the tables, targets and
   figures from the JSON (`study_report`).

Writes `--out` (benchmarks/results/transfer_study.json) after every run, so a rerun skips what is done (training
itself resumes from its last checkpoint), `transfer_study.png` (black-box cosines) and the face grids beside it.

    python -m benchmarks.transfer_study --folds mobileface_v3     # one fold
    python -m benchmarks.transfer_study --folds mobileface_v3,mobileface_v2,xiaoccer     # the three folds
    python -m benchmarks.transfer_study --diagnose                # where each run loses ESR / IRR, from the JSON
    python -m benchmarks.transfer_study --tiny --workdir /tmp/s --out /tmp/s/study.json   # minutes; what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import numpy as np

from benchmarks import results as results_lib
from benchmarks import study_scoring as scoring
from benchmarks.study_report import (BASELINES, KINDS, TARGETS, diagnose, face_grid, figures, fold_tables,
                                      paired_differences, summary, targets)
from benchmarks.study_scoring import MODELS, REPO

# Each fold's surrogates; its black boxes are the other three models.
FOLDS = {
    "mobileface_v3": ("foamliu", "xiaoccer", "mobileface_v2"),
    "mobileface_v2": ("foamliu", "xiaoccer", "mobileface_v3"),
    "xiaoccer": ("foamliu", "mobileface_v2", "mobileface_v3"),
    "foamliu": ("xiaoccer", "mobileface_v2", "mobileface_v3"),
}
DEFAULT_FOLDS = "mobileface_v3,mobileface_v2,xiaoccer"


@dataclasses.dataclass(frozen=True)
class Variant:
  """Config overrides on top of the study config: `stage2` changes stage 2 (and so needs its own stage-2 run),
  `stage3` only stage 3 (it continues a copy of the stage-2 run it shares)."""

  stage2: tuple[str, ...] = ()
  stage3: tuple[str, ...] = ()
  what: str = ""

  def as_json(self) -> dict[str, Any]:
    return {"stage2": list(self.stage2), "stage3": list(self.stage3), "what": self.what}


VARIANTS = {
    "study": Variant(what="configs/transfer_study.py as it is: the paper's method with the departures that earned "
                          "their place (l_era 1; stage 3 on L_era alone, Eq. 16)"),
    "with_id": Variant(stage3=("loss.l_era_id=10.0",),
                       what="stage 3 on L_era + 10 * L_id (R's output vs the source in the surrogates' embeddings); "
                            "fold V3: ESR -2 to +6 points a model, too weak at this weight"),
    "with_id_100": Variant(stage3=("loss.l_era_id=100.0",),
                           what="stage 3 on L_era + 100 * L_id: the identity term at the weight where it, not the "
                                "pixel residual (L_era ~30 at the plateau), leads R's gradient; fold V3: ESR +2 to +6 "
                                "points on every model, surrogate IRR 100%, LPIPS(rec, cov) 0.255 -> 0.249"),
    "inner_x1000": Variant(stage2=("attack.lr_inner=0.3",),
                           what="lr_inner = 1000 x lr (0.3): Eq. 10's inner SGD step about the size of the outer Adam "
                                "step (second_order_study: 1.25x; at lr_inner = lr it is 1.25e-3x and the Hessian term "
                                "is 0.03% of E_adv's gradient)"),
    "l_adv_exp": Variant(stage2=("loss.l_adv=279.1",),
                         what="l_adv = 200 x exp(1/3) = 279.1, for the ensemble: Eq. 11's weights are "
                              "exp(softmax(.)) ~ exp(1/K) = 1.40 each (1.386-1.403 measured), so meta_auxiliary's "
                              "L_adv is ~1.40x the ensemble's plain mean; this control separates that scale from the "
                              "meta-task"),
    "paper_l_era": Variant(stage2=("loss.l_era=150.0",), what="the paper's l_era = 150"),
}
DEFAULT_VARIANTS = "study,with_id_100,paper_l_era"


@dataclasses.dataclass
class Settings:
  config: str = "configs/transfer_study.py"
  config_arg: str = ""
  eval_identities: int = 12
  max_identities: int = 0  # 0: all 74; the tiny test uses a few
  seed: int = 0
  pgd_steps: int = 20
  bootstrap: int = 2000
  overrides: tuple[str, ...] = ()
  target_identity: int = -1  # -1: the first identity of the seed's draw (`split`); else this one

  def key(self) -> dict[str, Any]:
    key = dataclasses.asdict(self)
    if self.target_identity < 0:  # a drawn target: the key of the studies written before the option existed
      del key["target_identity"]
    return key


# ---------------------------------------------------------------------------------------------------------------------
# Training


def base_config(settings: Settings, faces_dir: pathlib.Path, target_id: int, eval_ids: list[int],
                surrogates: list[str], overrides: tuple[str, ...] = ()):
  from erasablemask_jax.config import load_config

  spec = settings.config + (f":{settings.config_arg}" if settings.config_arg else "")
  config = load_config(str(REPO / spec) if not os.path.isabs(spec) else spec,
                       [f"--config.{o}" for o in settings.overrides + tuple(overrides)])
  config.unlock()
  config.seed = settings.seed
  config.data.manual_dir = str(faces_dir)
  config.data.eval_identities = tuple(eval_ids)
  config.fr.target = f"identity:{target_id}"
  config.fr.surrogates = tuple(surrogates)
  config.lock()
  return config


def _copy_run(source: pathlib.Path, workdir: pathlib.Path) -> None:
  """`workdir` as a copy of the finished run `source`, made under another name and renamed (never half-made)."""
  if workdir.exists():
    return
  tmp = workdir.with_name(workdir.name + ".copying")
  shutil.rmtree(tmp, ignore_errors=True)  # our own half-made copy from an interrupted run
  shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("train.done"))  # the copy has its own training to do
  os.replace(tmp, workdir)


def train(config, workdir: pathlib.Path, start_from: pathlib.Path | None = None, **fields) -> float:
  """Trains `workdir` (a copy of `start_from` if it does not exist yet) under `config` with `fields` set (dotted keys,
  e.g. `attack.kind`); resumes from its last checkpoint. Returns wall seconds."""
  from erasablemask_jax.train.trainer import Trainer

  if start_from is not None:
    _copy_run(start_from, workdir)
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  start = time.perf_counter()
  Trainer(config, workdir).run()
  return time.perf_counter() - start


def train_once(config, workdir: pathlib.Path, start_from: pathlib.Path | None, **fields) -> float:
  """`train` unless `workdir/train.done` says it finished; returns the seconds it took (recorded there)."""
  done = workdir / "train.done"
  if done.is_file():
    return float(done.read_text())
  seconds = train(config, workdir, start_from, **fields)
  done.write_text(f"{seconds:.1f}\n")
  return seconds


CURVE_KEYS = ("stage", "e/adv", "e/era", "e/perb", "e/g", "e/att", "g/rec", "r/era", "r/id", "d/total")


def curve(workdir: pathlib.Path) -> list[dict]:
  """The logged losses of a run (metrics.jsonl): the terms that explain a result and each surrogate's cosine."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [{"step": r["step"], **{k: round(v, 5) for k, v in r.items()
                                 if k in CURVE_KEYS or (k.startswith("fr/") and k.endswith("/cos"))}} for r in rows]


def run_dirs(workdir: pathlib.Path, fold: str, kind: str, variant: str, tiny: bool) -> tuple[pathlib.Path, pathlib.Path]:
  """`(stage-2 run, final run)` folders of a study run: variants with the same stage-2 overrides share the first."""
  suffix = "_tiny" if tiny else ""
  shared = next(name for name, v in VARIANTS.items() if v.stage2 == VARIANTS[variant].stage2)
  return (workdir / f"stage2_{kind}_{shared}_bb-{fold}{suffix}", workdir / f"{kind}_{variant}_bb-{fold}{suffix}")


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def save(result: dict, out: pathlib.Path, argv) -> None:
  """`result` to `out` through `results.write_report` (this invocation's machine and command at the top; atomic)."""
  results_lib.write_report(out, "transfer_study", argv, {k: v for k, v in result.items() if k not in ("machine",
                                                                                                      "command")})


def split(faces: dict, eval_identities: int, seed: int, target: int = -1) -> tuple[int, list[int]]:
  """`(target identity, held-out identities)`. The seed's permutation of the identities draws both: the target is its
  first identity with two faces or more, the held-out ones the next `eval_identities`. A chosen `target` (>= 0, not
  held out) replaces the drawn one and the held-out identities stay the same, so studies of two targets score the
  same faces (the drawn target's faces then train)."""
  ids = np.unique(faces["identity"])
  counts = {int(i): int(np.sum(faces["identity"] == i)) for i in ids}
  order = [int(i) for i in np.random.default_rng(seed).permutation(ids)]
  drawn = next(i for i in order if counts[i] >= 2)
  rest = [i for i in order if i != drawn]
  if len(rest) < eval_identities + 2:
    raise SystemExit(f"error: {len(ids)} identities cannot give 1 target, {eval_identities} held out and a training "
                     "split; lower --eval-identities")
  eval_ids = sorted(rest[:eval_identities])
  if target < 0:
    return drawn, eval_ids
  if counts.get(target, 0) < 2 or target in eval_ids:
    raise SystemExit(f"error: --target-identity {target} must be an identity with two faces or more that is not held "
                     f"out ({eval_ids}); `--target-scan` lists the candidates")
  return target, eval_ids


def _names(value: str, known, what: str) -> list[str]:
  names = [n for n in value.split(",") if n]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise SystemExit(f"error: unknown {what} {unknown}; choose from {list(known)}")
  return names


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=None, help="aligned faces, models and runs (default runs/transfer_study_k3, "
                 "with --target-identity N runs/transfer_study_k3_target{N}: stage 1 trains without the target's faces)")
  p.add_argument("--out", default=None, help="the study's JSON (default benchmarks/results/transfer_study.json, with "
                 "--target-identity N transfer_study_target{N}.json)")
  p.add_argument("--target-identity", type=int, default=-1, metavar="N",
                 help="the target identity (default: drawn by the seed, identity 5 of the bundled faces; "
                      "`--target-scan` ranks the candidates by the clean faces' ESR)")
  p.add_argument("--folds", default=DEFAULT_FOLDS, help=f"folds in order, named by their MobileFaceNet-family black "
                 f"box (default {DEFAULT_FOLDS}; each fold's surrogates: {FOLDS})")
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"rows per fold, from {list(VARIANTS)}; 'study' is "
                 "trained for every kind, the others for --variant-kinds")
  p.add_argument("--variant-kinds", default="meta_auxiliary", help="attack kinds the non-study variants train")
  p.add_argument("--eval-identities", type=int, default=None, help="held-out identities (default 12; 3 with --tiny)")
  p.add_argument("--tiny", action="store_true", help="32x32, two steps per stage, 8 identities: the CI test")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="a study config override, e.g. schedule.stage2_steps=300 (recorded in the settings)")
  p.add_argument("--diagnose", action="store_true", help="print where each run of --out loses ESR / IRR and exit")
  p.add_argument("--tables", action="store_true", help="print --out's tables per fold (the README's) and exit")
  p.add_argument("--target-scan", metavar="FILE.json", help="instead of the study: the clean faces' ESR (the ceiling "
                 "of ESR) for every identity that could be the target, per model, written to FILE.json; --out is only "
                 "read (its calibration)")
  p.add_argument("--ablation", metavar="NAME", help="instead of the study: a short stage 2 from the shared stage 1 "
                 "with --ablation-override changes, its loss and cosine curves stored under 'ablations' in --out")
  p.add_argument("--ablation-override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--ablation-steps", type=int, default=60, help="stage-2 steps of an ablation")
  p.add_argument("--ablation-kind", default="meta_auxiliary", choices=KINDS)
  p.add_argument("--ablation-fold", default="mobileface_v3", choices=list(FOLDS))
  args = p.parse_args(argv)
  suffix = "" if args.target_identity < 0 else f"_target{args.target_identity}"
  args.workdir = args.workdir or str(REPO / "runs" / f"transfer_study_k3{suffix}")
  args.out = args.out or str(REPO / "benchmarks" / "results" / f"transfer_study{suffix}.json")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  if args.diagnose or args.tables:
    if not out.is_file():
      print(f"error: {out} not found; run the study first (or pass --out)", file=sys.stderr)
      return 2
    print((diagnose if args.diagnose else fold_tables)(json.loads(out.read_text())))
    return 0
  if not scoring.CELEBA.is_dir():
    print(f"error: {scoring.CELEBA} not found; the study needs ../shared/assets beside the checkout", file=sys.stderr)
    return 2
  try:
    folds = _names(args.folds, FOLDS, "fold")
    kinds = _names(args.kinds, KINDS, "attack kind")
    variants = _names(args.variants, VARIANTS, "variant")
    variant_kinds = _names(args.variant_kinds, KINDS, "attack kind")
  except SystemExit as e:
    print(e, file=sys.stderr)
    return 2
  eval_identities = args.eval_identities if args.eval_identities is not None else (3 if args.tiny else 12)
  settings = Settings(config_arg="tiny" if args.tiny else "", eval_identities=eval_identities,
                      max_identities=8 if args.tiny else 0, pgd_steps=2 if args.tiny else 20,
                      bootstrap=100 if args.tiny else 2000, overrides=tuple(args.override),
                      target_identity=args.target_identity)
  workdir = pathlib.Path(args.workdir)
  probe = base_config(settings, pathlib.Path("."), 0, [], [])
  # What the runs train, resolved from the config file and the overrides: a study whose config file has changed since
  # its JSON was written is another study, not one to resume.
  key = {**settings.key(), "schedule": {k: int(v) for k, v in probe.schedule.items() if k.endswith("_steps")},
         "loss": {k: v for k, v in probe.loss.items()}, "fr_fold_batchnorm": bool(probe.fr.get("fold_batchnorm", False)),
         "attack": {"lr_inner": float(probe.attack.lr_inner), "lr": float(probe.optim.lr)},
         "r_shortcut_layers": int(probe.model.r_shortcut_layers)}
  result = json.loads(out.read_text()) if out.is_file() else None
  if result is not None and result["settings"]["study"] != json.loads(json.dumps(key)):
    print(f"error: {out} holds a study with other settings ({result['settings']['study']}); pass another --out or "
          "move it away to start a new one", file=sys.stderr)
    return 2
  if result is not None:
    overrides = lambda j: (list(j["stage2"]), list(j["stage3"]))  # a variant's description may be reworded
    changed = [v for v in variants if v in result.get("variants", {})
               and overrides(result["variants"][v]) != overrides(VARIANTS[v].as_json())]
    if changed:
      print(f"error: {out} holds variants {changed} trained with other overrides; pass another --out", file=sys.stderr)
      return 2

  from tqdm import tqdm
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  from erasablemask_jax.fr import views

  started = time.time()
  size = probe.image_size
  view = views.view_name(probe.fr.input_crop, size)
  faces_dir = scoring.prepare_faces(workdir, size, settings.max_identities)
  faces = load_face_folder_arrays(faces_dir, size)
  specs = scoring.prepare_models()
  try:
    target_id, eval_ids = split(faces, settings.eval_identities, settings.seed, settings.target_identity)
  except SystemExit as e:
    print(e, file=sys.stderr)
    return 2
  if args.target_scan:
    return target_scan(args, probe, result, specs, faces, view, target_id, eval_ids)
  if result is None:
    result = {"settings": {"study": key, "image_size": size, "target_identity": target_id,
                           "eval_identities": eval_ids, "n_faces": int(len(faces["identity"])),
                           "n_identities": int(len(np.unique(faces["identity"]))), "models": specs,
                           "families": {m: scoring.family(m) for m in MODELS}, "folds": {f: {"surrogates": list(s), "blackbox": [
                               m for m in MODELS if m not in s]} for f, s in FOLDS.items()},
                           "machine": results_lib.machine(), "targets": TARGETS,
                           "command": "python -m benchmarks.transfer_study " + " ".join(argv or sys.argv[1:])},
              "calibration": scoring.calibrate_views(scoring.embed_faces(specs, faces, view), faces["identity"], view),
              "variants": {}, "runs": [], "timing": {}}
    save(result, out, argv)
  result["variants"].update({v: VARIANTS[v].as_json() for v in variants})

  if args.ablation:
    return ablation(args, settings, result, out, workdir, faces_dir, specs, target_id, eval_ids)

  plan = [(fold, b, None) for fold in folds for b in BASELINES]
  plan += [(fold, k, v) for fold in folds for k in kinds for v in variants if v == "study" or k in variant_kinds]
  done = {(r["fold"], r["attack"], r.get("variant")) for r in result["runs"]}
  bar = tqdm(total=len(plan), initial=sum(p in done for p in plan), desc="study", unit="run")
  stage1_dir = workdir / f"stage1_{'tiny' if args.tiny else size}"
  for fold in folds:
    whitebox = list(FOLDS[fold])
    blackbox = [m for m in MODELS if m not in whitebox]
    config = base_config(settings, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox])
    if not (stage1_dir / "train.done").is_file():
      result["timing"]["stage1_s"] = train_once(config, stage1_dir, None, **{"schedule.stage2_steps": 0,
                                                                             "schedule.stage3_steps": 0})
    scorer, splits = scoring.make_scorer(config, specs, result["calibration"], settings.bootstrap, settings.seed)
    if any((fold, b, None) not in done for b in BASELINES):
      t0 = time.perf_counter()
      for kind, entry in scoring.baselines(stage1_dir, scorer, splits.eval, whitebox, settings.pgd_steps,
                                           settings.seed).items():
        if (fold, kind, None) not in done:
          result["runs"].append({"fold": fold, "attack": kind, "variant": None, "surrogates": whitebox,
                                 "blackbox": blackbox, **entry})
          done.add((fold, kind, None))
          bar.update(1)
      result["timing"][f"baselines_bb-{fold}_s"] = time.perf_counter() - t0
      save(result, out, argv)
    for kind in kinds:
      for variant in variants:
        if (fold, kind, variant) in done or (variant != "study" and kind not in variant_kinds):
          continue
        v = VARIANTS[variant]
        stage2_dir, folder = run_dirs(workdir, fold, kind, variant, args.tiny)
        load_start = os.getloadavg()
        stage2_config = base_config(settings, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox], v.stage2)
        s2 = train_once(stage2_config, stage2_dir, stage1_dir, **{"attack.kind": kind, "schedule.stage3_steps": 0})
        run_config = base_config(settings, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox],
                                 v.stage2 + v.stage3)
        s3 = train_once(run_config, folder, stage2_dir, **{"attack.kind": kind})
        entry, images = scoring.evaluate_run(folder, scorer, splits.eval, whitebox)
        grid = face_grid(out, f"{fold}_{kind}_{variant}", images)
        result["runs"].append({"fold": fold, "attack": kind, "variant": variant, "surrogates": whitebox,
                               "blackbox": blackbox, **entry, "train_s": {"stage2": s2, "stage3": s3},
                               "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                               "faces": str(grid.relative_to(out.parent)), "curve": curve(folder)})
        done.add((fold, kind, variant))
        result["paired_difference_meta_auxiliary"] = paired_differences(result, settings.bootstrap, settings.seed)
        result["targets"] = targets(result)
        save(result, out, argv)
        figures(result, out)
        bar.update(1)
  bar.close()
  result["timing"]["last_invocation_s"] = time.time() - started
  result["paired_difference_meta_auxiliary"] = paired_differences(result, settings.bootstrap, settings.seed)
  result["targets"] = targets(result)
  save(result, out, argv)
  figures(result, out)
  print(summary(result))
  print(f"wrote {out} and {out.with_suffix('.png')}")
  return 0


def target_scan(args, probe, result: dict | None, specs: dict[str, str], faces: dict, view: str, target_id: int,
                eval_ids: list[int]) -> int:
  """`--target-scan`: `scoring.clean_esr_by_target` for every candidate target, ranked by its worst model."""
  embedded = scoring.embed_faces(specs, faces, view)
  calibration = (result["calibration"] if result is not None
                 else scoring.calibrate_views(embedded, faces["identity"], view))
  by_target = scoring.clean_esr_by_target(embedded, faces["identity"], calibration, eval_ids, float(probe.fr.tau2_far))
  ranked = sorted(by_target, key=lambda c: (-min(by_target[c].values()), -float(np.mean(list(by_target[c].values())))))
  rows = [{"identity": c, "study_target": c == target_id, "min_esr": min(by_target[c].values()), "esr": by_target[c]}
          for c in ranked]
  meets = [r["identity"] for r in rows if r["min_esr"] >= TARGETS["esr"]]
  results_lib.write_report(args.target_scan, "transfer_study", None, {
      "what": "per candidate target identity, the ESR (a fraction) of the untouched held-out faces on each model: cos to the "
              "target's faces under tau2 (FAR %g); the ceiling an exact restorer reaches" % probe.fr.tau2_far,
      "view": view, "eval_identities": eval_ids, "study_target": target_id, "esr_target": TARGETS["esr"],
      "candidates_meeting_esr_target": meets, "rows": rows})
  names = list(specs)
  print("identity  " + "  ".join(f"{n[:12]:>12}" for n in names) + "       min")
  for r in rows[:10] + [r for r in rows[10:] if r["study_target"]]:
    mark = " <- the study's target" if r["study_target"] else ""
    print(f"{r['identity']:>8}  " + "  ".join(f"{100 * r['esr'][n]:12.1f}" for n in names) + f"  {100 * r['min_esr']:8.1f}{mark}")
  print(f"{len(meets)} of {len(rows)} candidates give ESR >= {100 * TARGETS['esr']:.0f}% on every model to the clean faces; "
        f"wrote {args.target_scan}")
  return 0


def ablation(args, settings: Settings, result: dict, out: pathlib.Path, workdir: pathlib.Path,
             faces_dir: pathlib.Path, specs: dict[str, str], target_id: int, eval_ids: list[int]) -> int:
  """A short stage 2 of one attack kind from the shared stage 1, with config changes; its curves go to the JSON."""
  stage1_dir = workdir / f"stage1_{'tiny' if args.tiny else result['settings']['image_size']}"
  if not (stage1_dir / "train.done").is_file():
    print("error: the shared stage 1 is not trained yet; run the study first", file=sys.stderr)
    return 2
  overrides = tuple(args.ablation_override) + (f"schedule.stage2_steps={args.ablation_steps}",
                                                "schedule.stage3_steps=0")
  whitebox = list(FOLDS[args.ablation_fold])
  config = base_config(settings, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox], overrides)
  folder = workdir / f"ablation_{args.ablation}"
  seconds = train(config, folder, stage1_dir, **{"attack.kind": args.ablation_kind})
  rows = [r for r in curve(folder) if r.get("stage") == 2]
  last = rows[-3:]
  result.setdefault("ablations", {})[args.ablation] = {
      "kind": args.ablation_kind, "surrogates": whitebox, "overrides": list(args.ablation_override),
      "stage2_steps": args.ablation_steps, "train_s": seconds, "loadavg": list(os.getloadavg()),
      "final_fr_cos": {w: float(np.mean([r[f"fr/{i}/cos"] for r in last])) for i, w in enumerate(whitebox)},
      "curve": rows}
  save(result, out, argv)
  print(json.dumps({k: v for k, v in result["ablations"][args.ablation].items() if k != "curve"}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
