"""Black-box transfer and identity recovery on real FR models: `python benchmarks/transfer_study.py`.

The study the paper's Table II / VII rows stand for, at the scale of a 2-core CPU, with the three real FR models of
`../shared/assets` (foamliu MobileFaceNet, Xiaoccer MobileFaceNet, becauseofAI MobileFace V2):

1. data: the 296 CelebA photos of 74 identities, aligned by our MTCNN to loose 128 crops, 13 attributes from
   `list_attr_celeba_subset.txt`; split by identity (seeded): one target identity, `--eval-identities` (12) held out
   of training, the rest trains;
2. thresholds: each FR model's genuine/impostor ROC on all 296 crops through the view it gets in training and
   evaluation (the ArcFace box of the loose crop, resized to its input), tau1 at FAR 0.01, tau2 at FAR 0.1;
3. stage 1 once (it has no attack), then stages 2-3 for each attack kind (meta_auxiliary, first_order, ensemble) and
   each leave-one-out fold (two surrogates white-box, the third black-box), same steps and seeds;
4. per run and FR model, on the held-out faces rounded to uint8 as `protect` publishes them: ASR, ESR, IRR, SMR, mean
   cos(x_adv, target) with a bootstrap 95% CI over faces, the rates again after libjpeg JPEG quality 50, L1/MSE of
   x_adv vs x_cov^{att_b} and of x_rec vs x_cov; the clean, attribute-edit, FGSM and PGD (4/255) baselines against the
   same surrogates.

Writes `--out` (benchmarks/transfer_study.json) after every run, so a rerun skips what is done (training itself
resumes from its last checkpoint), a figure `transfer_study.png` (black-box cosine per attack kind with CI) and a face
grid `transfer_study_faces.png` (source | edit | protected | restored) beside it.

    python benchmarks/transfer_study.py                       # the V2 black-box fold (~55 min on 2 cores)
    python benchmarks/transfer_study.py --folds mobileface_v2,xiaoccer,foamliu   # all three (~2.5 h)
    python benchmarks/transfer_study.py --tiny --workdir /tmp/s --out /tmp/s/study.json   # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = pathlib.Path(os.environ.get("ERASABLEMASK_ASSETS", REPO.parent / "shared" / "assets"))
CELEBA = ASSETS / "images" / "celeba_wild_identities"
KINDS = ("meta_auxiliary", "first_order", "ensemble")
BASELINES = ("clean", "edit", "fgsm", "pgd")
# Each FR model: how to get a converted directory (bundled, converted from ../shared/assets into the workdir, or
# ("shared", NAME): `shared:NAME` of `erasablemask_jax.fr.real_models`, converted once into ~/.cache/erasablemask/fr,
# e.g. "faceres": ("shared", "faceres"), "faceres_deep": ("shared", "faceres_deep"),
# "mobileface_v3": ("shared", "mobileface_v3"), the TF.js models).
MODELS = {
    "mobileface_v2": ("mobileface_v2", ASSETS / "models/becauseofai_mobileface_v2/MobileFace_Identification_V2-0000.params"),
    "xiaoccer": ("mobilefacenet_sphereface", ASSETS / "models/xiaoccer_mobilefacenet_068.ckpt"),
    "foamliu": ("bundled", "mobilefacenet"),
}
# The paper's rows for the same columns (CelebA-HQ, full scale), for the README table.
PAPER = {"asr_blackbox_range": [64.00, 94.00], "mobileface_asr_esr": [92.22, 94.89],
         "ensemble_ablation_mobileface_asr": 90.67}


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

  def key(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Data, models, thresholds


def prepare_faces(workdir: pathlib.Path, size: int, max_identities: int) -> pathlib.Path:
  """Aligns the CelebA photos with our MTCNN (loose template) and writes `attributes.csv` with identities."""
  from erasablemask_jax.align import pipeline
  from erasablemask_jax.data import labels

  identities = dict(line.split() for line in (CELEBA / "identity_CelebA_subset.txt").read_text().splitlines()[1:])
  chosen = sorted(set(identities.values()), key=int)
  if max_identities:
    chosen = chosen[:max_identities]
  files = sorted(f for f, i in identities.items() if i in chosen)
  out = workdir / f"faces_{size}_{len(chosen)}"
  folder = out / f"loose_{size}"
  if (folder / "attributes.csv").is_file():
    return folder
  photos = workdir / f"photos_{len(chosen)}"
  photos.mkdir(parents=True, exist_ok=True)
  for f in files:
    if not (photos / f).exists():
      os.symlink((CELEBA / f).resolve(), photos / f)
  pipeline.align_folder(photos, out, size=size, templates=("loose",))
  lines = (CELEBA / "list_attr_celeba_subset.txt").read_text().splitlines()
  header = lines[1].split()
  columns = [header.index(a) for a in labels.ATTRIBUTES]
  index = {cid: i for i, cid in enumerate(chosen)}
  rows = ["file,identity," + ",".join(labels.ATTRIBUTES)]
  for line in lines[2:]:
    name, *values = line.split()
    png = pathlib.Path(name).with_suffix(".png").name
    if name in identities and identities[name] in index and (folder / png).is_file():
      rows.append(f"{png},{index[identities[name]]}," + ",".join("1" if values[c] == "1" else "0" for c in columns))
  tmp = folder / "attributes.csv.tmp"
  tmp.write_text("\n".join(rows) + "\n")
  os.replace(tmp, folder / "attributes.csv")
  return folder


def prepare_models(workdir: pathlib.Path) -> dict[str, str]:
  """`{name: surrogate spec}`: the bundled foamliu net, the other two converted once into `workdir/models`."""
  from erasablemask_jax import convert
  from erasablemask_jax.fr import archs  # pylint: disable=unused-import  (registers the FR architectures)

  specs = {}
  for name, (arch, source) in MODELS.items():
    if arch in ("bundled", "shared"):
      specs[name] = f"{arch}:{source}"
      continue
    out = workdir / "models" / name
    if not (out / "card.json").is_file():
      convert.convert_checkpoint(arch, source, out)
    specs[name] = str(out)
  return specs


def calibrate_views(specs: dict[str, str], faces: dict[str, np.ndarray], view: str) -> dict[str, dict]:
  """ROC of each FR model on every aligned face through the view it gets in training (thresholds per view)."""
  from erasablemask_jax.fr import calibration

  stems = [str(i) for i in range(len(faces["identity"]))]
  genuine, impostor = calibration.pairs_from_identities(stems, dict(zip(stems, faces["identity"].tolist())))
  out = {}
  for name, spec in specs.items():
    recogniser = load_recogniser(spec)
    emb = calibration.embed_view(recogniser, list(faces["image"]), view)
    m = calibration.metrics_from_embeddings(emb, genuine, impostor, fars=(0.1, 0.01, 0.001))
    out[name] = {"view": view, "input_size": list(recogniser.input_size), "auc": m["auc"],
                 "tar_at_far": m["tar_at_far"], "thresholds": m["thresholds"], "n_images": len(stems),
                 "n_genuine": int(len(genuine)), "n_impostor": int(len(impostor))}
  return out


def load_recogniser(spec: str):
  from erasablemask_jax import fr
  from erasablemask_jax.fr import real_models

  return fr.load(real_models.model_dir(spec))


# ---------------------------------------------------------------------------------------------------------------------
# Training


def base_config(settings: Settings, faces_dir: pathlib.Path, target_id: int, eval_ids: list[int],
                surrogates: list[str]):
  from erasablemask_jax.config import load_config

  spec = settings.config + (f":{settings.config_arg}" if settings.config_arg else "")
  config = load_config(str(REPO / spec) if not os.path.isabs(spec) else spec, [f"--config.{o}" for o in
                                                                               settings.overrides])
  config.unlock()
  config.seed = settings.seed
  config.data.manual_dir = str(faces_dir)
  config.data.eval_identities = tuple(eval_ids)
  config.fr.target = f"identity:{target_id}"
  config.fr.surrogates = tuple(surrogates)
  config.lock()
  return config


def train_run(config, workdir: pathlib.Path, stage1_dir: pathlib.Path, kind: str) -> float:
  """Stages 2-3 of one attack kind, starting from a copy of the shared stage-1 run. Returns wall seconds."""
  from erasablemask_jax.train.trainer import Trainer

  if not workdir.exists():
    tmp = workdir.with_name(workdir.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)  # our own half-made copy from an interrupted run
    shutil.copytree(stage1_dir, tmp)
    os.replace(tmp, workdir)
  config = config.copy_and_resolve_references()
  config.unlock()
  config.attack.kind = kind
  config.lock()
  start = time.perf_counter()
  Trainer(config, workdir).run()
  return time.perf_counter() - start


def train_stage1(config, workdir: pathlib.Path) -> float:
  from erasablemask_jax.train.trainer import Trainer

  config = config.copy_and_resolve_references()
  config.unlock()
  config.schedule.stage2_steps = 0
  config.schedule.stage3_steps = 0
  config.lock()
  start = time.perf_counter()
  Trainer(config, workdir).run()
  return time.perf_counter() - start


CURVE_KEYS = ("stage", "e/adv", "e/era", "e/perb", "e/g", "e/att", "g/rec", "r/era", "d/total")


def curve(workdir: pathlib.Path) -> list[dict]:
  """The logged losses of a run (metrics.jsonl): the terms that explain a result and each surrogate's cosine."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [{"step": r["step"], **{k: round(v, 5) for k, v in r.items()
                                 if k in CURVE_KEYS or (k.startswith("fr/") and k.endswith("/cos"))}} for r in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def to_uint8(x: np.ndarray) -> np.ndarray:
  from erasablemask_jax.image_io import to_uint8 as float_to_uint8
  return float_to_uint8(x)


def to_float(x: np.ndarray) -> np.ndarray:
  from erasablemask_jax.inference.run import to_model_input
  return to_model_input(x)


def jpeg50(images: np.ndarray) -> np.ndarray:
  """Real libjpeg (Pillow, `noise.jpeg_libjpeg`) at quality 50, uint8 in and out."""
  from erasablemask_jax import noise

  return to_uint8(np.asarray(noise.jpeg_libjpeg(jnp.asarray(to_float(images)), 50)))


def bootstrap_ci(values: np.ndarray, reps: int, seed: int) -> list[float]:
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(values), size=(reps, len(values)))
  means = values[idx].mean(axis=1)
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


class Scorer:
  """Every FR model's embeddings of uint8 faces (through its training view) and the rates of SPEC.md."""

  def __init__(self, specs: dict[str, str], input_crop: str, image_size: int, target: np.ndarray, calibration: dict,
               tau1_far: float, tau2_far: float, bootstrap: int, seed: int):
    from erasablemask_jax.fr import views
    from erasablemask_jax.fr.surrogates import load_surrogate

    self.surrogates = {name: load_surrogate(spec, input_crop) for name, spec in specs.items()}
    self.view = views.view_name(input_crop, image_size)
    self.tau1 = {n: calibration[n]["thresholds"][f"far_{tau1_far:g}"] for n in specs}
    self.tau2 = {n: calibration[n]["thresholds"][f"far_{tau2_far:g}"] for n in specs}
    self.target = {n: self.embed(n, target) for n in specs}  # (T, D): one row per target image
    self.bootstrap, self.seed = bootstrap, seed

  def embed(self, name: str, images_uint8: np.ndarray) -> np.ndarray:
    from erasablemask_jax.fr import calibration

    return calibration.embed_view(self.surrogates[name].recogniser, list(images_uint8), self.view, batch_size=32)

  def rates(self, name: str, source: np.ndarray, adv: np.ndarray, rec: np.ndarray | None) -> dict[str, Any]:
    """ASR/SMR of the protected faces, ESR/IRR of the restored ones (None without a restorer)."""
    from erasablemask_jax.metrics import recognition

    e_src, e_adv = self.embed(name, source), self.embed(name, adv)
    cos_adv = recognition.target_cosine(e_adv, self.target[name])
    cos_adv_src = np.asarray(recognition.cosine(e_adv, e_src))
    tau1, tau2 = self.tau1[name], self.tau2[name]
    out = {"asr": recognition.attack_success_rate(cos_adv, tau1), "smr": recognition.source_match_rate(cos_adv_src, tau1),
           "cos_adv_mean": float(cos_adv.mean()),
           "cos_adv_ci95": bootstrap_ci(cos_adv, self.bootstrap, self.seed),
           "cos_adv_source_mean": float(cos_adv_src.mean()), "esr": None, "irr": None,
           "cos_adv": cos_adv.round(5).tolist(), "cos_adv_source": cos_adv_src.round(5).tolist()}
    if rec is not None:
      e_rec = self.embed(name, rec)
      cos_rec = recognition.target_cosine(e_rec, self.target[name])
      cos_rec_src = np.asarray(recognition.cosine(e_rec, e_src))
      out.update({"esr": recognition.erasure_success_rate(cos_rec, tau2),
                  "irr": recognition.identity_recovery_rate(cos_rec_src, tau1),
                  "cos_rec_mean": float(cos_rec.mean()), "cos_rec_source_mean": float(cos_rec_src.mean()),
                  "cos_rec_source_ci95": bootstrap_ci(cos_rec_src, self.bootstrap, self.seed),
                  "cos_rec": cos_rec.round(5).tolist(), "cos_rec_source": cos_rec_src.round(5).tolist()})
    return out


def make_scorer(config, specs: dict[str, str], result: dict, settings: Settings):
  """`(scorer, splits)`: the study's Scorer (its calibration, the config's thresholds) and the face splits of `config`
  (whose `target` it scores against and whose `eval` faces it scores)."""
  from erasablemask_jax.data.faces import load_face_splits  # pylint: disable=g-import-not-at-top

  splits = load_face_splits(config.data, config.fr, config.image_size)
  scorer = Scorer(specs, config.fr.input_crop, config.image_size, splits.target, result["calibration"],
                  config.fr.tau1_far, config.fr.tau2_far, settings.bootstrap, settings.seed)
  return scorer, splits


def run_dir(workdir: pathlib.Path, kind: str, fold: str, tiny: bool) -> pathlib.Path:
  """The workdir of the study's `kind` run with `fold` black-box."""
  return workdir / f"{kind}_bb-{fold}{'_tiny' if tiny else ''}"


def quality(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
  """L1 and MSE on [0, 1] (`metrics.quality`) and LPIPS (AlexNet) of two uint8 batches; LPIPS says why it is missing
  when the `metrics` extra is not installed or the faces are too small for AlexNet."""
  from erasablemask_jax.metrics import lpips
  from erasablemask_jax.metrics import quality as quality_lib

  x, y = to_float(a), to_float(b)
  out = {"l1": quality_lib.l1(x, y), "mse": quality_lib.mse(x, y)}
  try:
    out["lpips"] = float(np.mean(lpips.default_lpips(x, y)))
  except (lpips.PretrainedWeightsUnavailable, ValueError) as e:
    out.update({"lpips": None, "lpips_reason": str(e)})
  return out


def per_model(scorer: Scorer, whitebox: list[str], source, adv, rec, restore=None) -> dict[str, Any]:
  metrics = {}
  adv_jpeg = jpeg50(adv)
  rec_jpeg = restore(adv_jpeg) if restore is not None else None
  for name in scorer.surrogates:
    m = scorer.rates(name, source, adv, rec)
    j = scorer.rates(name, source, adv_jpeg, rec_jpeg)
    m["jpeg50"] = {k: j[k] for k in ("asr", "smr", "esr", "irr", "cos_adv_mean", "cos_adv_ci95")}
    m["whitebox"] = name in whitebox
    m["tau1"], m["tau2"] = scorer.tau1[name], scorer.tau2[name]
    metrics[name] = m
  return metrics


def evaluate_run(workdir: pathlib.Path, scorer: Scorer, eval_faces: dict, whitebox: list[str]) -> tuple[dict, dict]:
  """Protect -> uint8 -> restore -> uint8 on the held-out faces; every FR model's rates. Returns (entry, images)."""
  from erasablemask_jax.inference.run import load_run
  from erasablemask_jax.evaluation.report import protect_and_restore
  from erasablemask_jax.evaluation.report import published

  run = load_run(workdir)
  source = eval_faces["image"]
  att_a = eval_faces["att"].astype(np.float32)
  att_b = np.roll(att_a, 1, axis=0)  # a permutation of the held-out labels, as in training
  out = {k: to_uint8(v) for k, v in protect_and_restore(run, to_float(source), att_a, att_b).items()}
  restore = lambda adv: to_uint8(published(run.restore(to_float(adv), att_a)))
  entry = {"metrics": per_model(scorer, whitebox, source, out["adv"], out["rec"], restore),
           "quality": {"adv_vs_edit": quality(out["adv"], out["edit"]), "rec_vs_cov": quality(out["rec"], source)},
           "step": run.step}
  return entry, {"source": source, **out}


def baselines(stage1_dir: pathlib.Path, scorer: Scorer, eval_faces: dict, whitebox: list[str], pgd_steps: int,
              seed: int) -> dict[str, dict]:
  """Clean faces, the attribute edit of the stage-1 G, and FGSM / PGD at 4/255 against the white-box surrogates."""
  from erasablemask_jax.inference.run import load_run
  from erasablemask_jax.metrics import recognition

  source = eval_faces["image"]
  x = to_float(source)
  run = load_run(stage1_dir)
  _, x_edit = run.protect(x, np.roll(eval_faces["att"].astype(np.float32), 1, axis=0))
  fns = [jax.tree_util.Partial(scorer.surrogates[n].apply, scorer.surrogates[n].variables) for n in whitebox]
  targets = [jnp.asarray(scorer.target[n].mean(axis=0)) for n in whitebox]
  images = {"clean": source, "edit": to_uint8(x_edit), "fgsm": to_uint8(recognition.fgsm(x, fns, targets)),
            "pgd": to_uint8(recognition.pgd(x, fns, targets, num_steps=pgd_steps, rng=jax.random.key(seed)))}
  out = {}
  for kind, adv in images.items():
    out[kind] = {"metrics": per_model(scorer, whitebox, source, adv, None),
                 "quality": {"adv_vs_cov": quality(adv, source)}}
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Figures and the driver


def figures(result: dict, out: pathlib.Path, images: dict | None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  folds = sorted({r["blackbox"][0] for r in result["runs"]})
  if not folds:
    return
  fig, axes = plt.subplots(1, len(folds), figsize=(5 * len(folds), 3.6), squeeze=False)
  order = list(BASELINES) + list(KINDS)
  for ax, bb in zip(axes[0], folds):
    runs = {r["attack"]: r for r in result["runs"] if r["blackbox"][0] == bb}
    names = [k for k in order if k in runs]
    means = [runs[k]["metrics"][bb]["cos_adv_mean"] for k in names]
    lo = [m - runs[k]["metrics"][bb]["cos_adv_ci95"][0] for k, m in zip(names, means)]
    hi = [runs[k]["metrics"][bb]["cos_adv_ci95"][1] - m for k, m in zip(names, means)]
    colors = ["#999999" if k in BASELINES else "#1f77b4" for k in names]
    ax.bar(range(len(names)), means, yerr=[lo, hi], color=colors, capsize=3)
    tau1 = result["calibration"][bb]["thresholds"]["far_0.01"]
    ax.axhline(tau1, color="r", ls="--", lw=1, label=f"tau1 (FAR 0.01) = {tau1:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title(f"black box: {bb}")
    ax.set_ylabel("cos(x_adv, target), mean with 95% CI")
    ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = out.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, out.with_suffix(".png"))
  if images is not None:
    from erasablemask_jax.image_io import save_image_grid
    n = min(6, len(images["source"]))
    save_image_grid(out.with_name(out.stem + "_faces.png"),
                    [to_float(images[k][:n]) for k in ("source", "edit", "adv", "rec")])


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "loadavg": list(os.getloadavg())}


def save(result: dict, out: pathlib.Path) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(result, indent=1))
  os.replace(tmp, out)


def split(faces: dict, eval_identities: int, seed: int) -> tuple[int, list[int]]:
  ids = np.unique(faces["identity"])
  counts = {int(i): int(np.sum(faces["identity"] == i)) for i in ids}
  order = [int(i) for i in np.random.default_rng(seed).permutation(ids)]
  target = next(i for i in order if counts[i] >= 2)
  rest = [i for i in order if i != target]
  if len(rest) < eval_identities + 2:
    raise SystemExit(f"error: {len(ids)} identities cannot give 1 target, {eval_identities} held out and a training "
                     "split; lower --eval-identities")
  return target, sorted(rest[:eval_identities])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=str(REPO / "runs" / "transfer_study"), help="aligned faces, models and runs")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "transfer_study.json"))
  p.add_argument("--folds", default="mobileface_v2",
                 help="black-box model of each leave-one-out fold, in order (default: the MobileFace V2 fold, ~55 min "
                      "on the 2-core CPU; add xiaoccer,foamliu for the other two, ~45 min each)")
  p.add_argument("--kinds", default=",".join(KINDS))
  p.add_argument("--eval-identities", type=int, default=None, help="held-out identities (default 12; 3 with --tiny)")
  p.add_argument("--tiny", action="store_true", help="32x32, two steps per stage, 8 identities: the CI test")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="a study config override, e.g. schedule.stage2_steps=300 (recorded in the settings)")
  p.add_argument("--ablation", metavar="NAME", help="instead of the study: a short stage 2 from the shared stage 1 "
                 "with --ablation-override changes, its loss and cosine curves stored under 'ablations' in --out")
  p.add_argument("--ablation-override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--ablation-steps", type=int, default=60, help="stage-2 steps of an ablation")
  p.add_argument("--ablation-kind", default="meta_auxiliary", choices=KINDS)
  p.add_argument("--ablation-fold", default="mobileface_v2", choices=list(MODELS))
  p.add_argument("--extend-stage3", type=int, default=0, metavar="N",
                 help="with --ablation NAME: copy the finished study run of --ablation-kind / --ablation-fold, train "
                      "its stage 3 to N steps and evaluate it as a study run (metrics under 'ablations')")
  args = p.parse_args(argv)
  if not CELEBA.is_dir():
    print(f"error: {CELEBA} not found; the study needs ../shared/assets beside the checkout", file=sys.stderr)
    return 2
  eval_identities = args.eval_identities if args.eval_identities is not None else (3 if args.tiny else 12)
  settings = Settings(config_arg="tiny" if args.tiny else "", eval_identities=eval_identities,
                      max_identities=8 if args.tiny else 0, pgd_steps=2 if args.tiny else 20,
                      bootstrap=100 if args.tiny else 2000, overrides=tuple(args.override))
  folds = [f for f in args.folds.split(",") if f]
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = [f for f in folds if f not in MODELS] + [k for k in kinds if k not in KINDS]
  if unknown:
    print(f"error: unknown fold or kind {unknown}; folds: {list(MODELS)}, kinds: {list(KINDS)}", file=sys.stderr)
    return 2
  workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  probe = base_config(settings, pathlib.Path("."), 0, [], [])
  # What the runs train, resolved from the config file and the overrides: a study whose config file has changed since
  # its JSON was written is another study, not one to resume.
  key = {**settings.key(), "schedule": {k: int(v) for k, v in probe.schedule.items() if k.endswith("_steps")},
         "fr_fold_batchnorm": bool(probe.fr.get("fold_batchnorm", False))}
  result = json.loads(out.read_text()) if out.is_file() else None
  if result is not None and result["settings"]["study"] != json.loads(json.dumps(key)):
    print(f"error: {out} holds a study with other settings ({result['settings']['study']}); pass another --out or "
          "move it away to start a new one", file=sys.stderr)
    return 2

  from tqdm import tqdm
  from erasablemask_jax.data.pipeline import load_face_folder_arrays
  from erasablemask_jax.fr import views

  started = time.time()
  size = probe.image_size
  faces_dir = prepare_faces(workdir, size, settings.max_identities)
  faces = load_face_folder_arrays(faces_dir, size)
  specs = prepare_models(workdir)
  target_id, eval_ids = split(faces, settings.eval_identities, settings.seed)
  if result is None:
    result = {"settings": {"study": key, "image_size": size, "target_identity": target_id,
                           "eval_identities": eval_ids, "n_faces": int(len(faces["identity"])),
                           "n_identities": int(len(np.unique(faces["identity"]))), "models": specs,
                           "machine": machine(), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))},
              "calibration": calibrate_views(specs, faces, views.view_name(probe.fr.input_crop, size)), "runs": [], "timing": {}}
    save(result, out)

  if args.ablation and args.extend_stage3:
    return extend_stage3(args, settings, result, out, workdir, faces_dir, specs, target_id, eval_ids)
  if args.ablation:
    return ablation(args, settings, result, out, workdir, faces_dir, specs, target_id, eval_ids)

  plan = [(bb, k) for bb in folds for k in list(BASELINES) + kinds]
  done = {(r["blackbox"][0], r["attack"]) for r in result["runs"]}
  bar = tqdm(total=len(plan), initial=sum(p in done for p in plan), desc="study", unit="run")
  last_images = None
  stage1_dir = workdir / f"stage1_{'tiny' if args.tiny else size}"
  for bb in folds:
    whitebox = [m for m in MODELS if m != bb]
    config = base_config(settings, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox])
    if not (stage1_dir / "stage1.done").is_file():
      seconds = train_stage1(config, stage1_dir)
      (stage1_dir / "stage1.done").write_text(f"{seconds:.1f}\n")
      result["timing"]["stage1_s"] = seconds
    scorer, splits = make_scorer(config, specs, result, settings)
    eval_faces = splits.eval
    if any((bb, b) not in done for b in BASELINES):
      t0 = time.perf_counter()
      for kind, entry in baselines(stage1_dir, scorer, eval_faces, whitebox, settings.pgd_steps, settings.seed).items():
        if (bb, kind) not in done:
          result["runs"].append({"attack": kind, "surrogates": whitebox, "blackbox": [bb], **entry})
          done.add((bb, kind))
          bar.update(1)
      result["timing"][f"baselines_bb-{bb}_s"] = time.perf_counter() - t0
      save(result, out)
    for kind in kinds:
      if (bb, kind) in done:
        continue
      folder = run_dir(workdir, kind, bb, args.tiny)
      load_start = os.getloadavg()
      seconds = train_run(config, folder, stage1_dir, kind)
      entry, images = evaluate_run(folder, scorer, eval_faces, whitebox)
      result["runs"].append({"attack": kind, "surrogates": whitebox, "blackbox": [bb], **entry,
                             "train_s": seconds, "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                             "curve": curve(folder)})
      done.add((bb, kind))
      save(result, out)
      if kind == "meta_auxiliary":
        last_images = images
      figures(result, out, last_images)
      bar.update(1)
  bar.close()
  result["timing"]["last_invocation_s"] = time.time() - started
  result["paired_difference_meta_auxiliary"] = paired_differences(result, settings.bootstrap, settings.seed)
  save(result, out)
  figures(result, out, last_images)
  print(summary(result))
  print(f"wrote {out} and {out.with_suffix('.png')}")
  return 0


def ablation(args, settings: Settings, result: dict, out: pathlib.Path, workdir: pathlib.Path,
             faces_dir: pathlib.Path, specs: dict[str, str], target_id: int, eval_ids: list[int]) -> int:
  """A short stage 2 of one attack kind from the shared stage 1, with config changes; its curves go to the JSON."""
  stage1_dir = workdir / f"stage1_{'tiny' if args.tiny else result['settings']['image_size']}"
  if not (stage1_dir / "stage1.done").is_file():
    print("error: the shared stage 1 is not trained yet; run the study first", file=sys.stderr)
    return 2
  overrides = tuple(args.ablation_override) + (f"schedule.stage2_steps={args.ablation_steps}",
                                                "schedule.stage3_steps=0")
  changed = dataclasses.replace(settings, overrides=settings.overrides + overrides)
  whitebox = [m for m in MODELS if m != args.ablation_fold]
  config = base_config(changed, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox])
  folder = workdir / f"ablation_{args.ablation}"
  seconds = train_run(config, folder, stage1_dir, args.ablation_kind)
  rows = [r for r in curve(folder) if r.get("stage") == 2]
  last = rows[-3:]
  result.setdefault("ablations", {})[args.ablation] = {
      "kind": args.ablation_kind, "surrogates": whitebox, "overrides": list(args.ablation_override),
      "stage2_steps": args.ablation_steps, "train_s": seconds, "loadavg": list(os.getloadavg()),
      "final_fr_cos": {w: float(np.mean([r[f"fr/{i}/cos"] for r in last])) for i, w in enumerate(whitebox)},
      "curve": rows}
  save(result, out)
  print(json.dumps({k: v for k, v in result["ablations"][args.ablation].items() if k != "curve"}, indent=1))
  return 0


def extend_stage3(args, settings: Settings, result: dict, out: pathlib.Path, workdir: pathlib.Path,
                  faces_dir: pathlib.Path, specs: dict[str, str], target_id: int, eval_ids: list[int]) -> int:
  """A finished study run with a longer stage 3 (R alone), evaluated on the held-out faces like the run itself."""
  source = run_dir(workdir, args.ablation_kind, args.ablation_fold, args.tiny)
  if not any(r["attack"] == args.ablation_kind and r["blackbox"] == [args.ablation_fold] for r in result["runs"]):
    print(f"error: the study has no finished {args.ablation_kind} run of the {args.ablation_fold} fold to extend; "
          "run the study first", file=sys.stderr)
    return 2
  whitebox = [m for m in MODELS if m != args.ablation_fold]
  stage3_steps = result["settings"]["study"]["schedule"]["stage3_steps"]  # what the study's runs trained
  if args.extend_stage3 <= stage3_steps:
    print(f"error: --extend-stage3 {args.extend_stage3} does not lengthen stage 3 ({stage3_steps} steps in the "
          "study)", file=sys.stderr)
    return 2
  changed = dataclasses.replace(settings, overrides=settings.overrides + (f"schedule.stage3_steps={args.extend_stage3}",))
  config = base_config(changed, faces_dir, target_id, eval_ids, [specs[m] for m in whitebox])
  seconds = train_run(config, workdir / f"ablation_{args.ablation}", source, args.ablation_kind)
  scorer, splits = make_scorer(config, specs, result, settings)
  entry, _ = evaluate_run(workdir / f"ablation_{args.ablation}", scorer, splits.eval, whitebox)
  result.setdefault("ablations", {})[args.ablation] = {
      "kind": args.ablation_kind, "surrogates": whitebox, "blackbox": [args.ablation_fold],
      "overrides": [f"schedule.stage3_steps={args.extend_stage3}"], "from_run": source.name, "train_s": seconds,
      "loadavg": list(os.getloadavg()), **entry,
      "curve": [r for r in curve(workdir / f"ablation_{args.ablation}") if r.get("stage") == 3]}
  save(result, out)
  print(json.dumps({m: {k: v[k] for k in ("asr", "esr", "irr", "smr")} for m, v in entry["metrics"].items()}, indent=1))
  return 0


def paired_differences(result: dict, reps: int, seed: int) -> dict[str, Any]:
  """Per fold and FR model, meta_auxiliary's per-face cos(x_adv, target) minus each other attack kind's on the same
  faces: the mean, its bootstrap 95% CI over faces and how many faces meta_auxiliary moved further."""
  out: dict[str, Any] = {"what": "per-face cos(x_adv, target) of meta_auxiliary minus the other kind, same faces, "
                                 f"bootstrap 95% CI over faces ({reps} resamples, seed {seed})"}
  runs = {(r["blackbox"][0], r["attack"]): r for r in result["runs"]}
  for (bb, kind), meta in runs.items():
    if kind != "meta_auxiliary":
      continue
    for other in ("ensemble", "first_order"):
      if (bb, other) not in runs:
        continue
      for model, m in meta["metrics"].items():
        d = np.asarray(m["cos_adv"]) - np.asarray(runs[bb, other]["metrics"][model]["cos_adv"])
        out.setdefault(f"bb-{bb}", {})[f"{model}_vs_{other}"] = {
            "mean": float(d.mean()), "ci95": bootstrap_ci(d, reps, seed), "faces_meta_higher": int((d > 0).sum()),
            "n": int(d.size)}
  return out


def summary(result: dict) -> str:
  """A Markdown table: per fold and attack, black-box and white-box ASR/ESR/IRR/SMR and the black-box cosine."""
  pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
  lines = ["| black box | attack | BB ASR | BB ESR | BB IRR | BB SMR | BB cos(adv,t) [95% CI] | WB ASR | WB IRR | "
           "BB ASR JPEG50 |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["runs"]:
    bb = r["blackbox"][0]
    m = r["metrics"][bb]
    wb = [r["metrics"][w] for w in r["surrogates"]]
    wb_asr = np.mean([w["asr"] for w in wb])
    wb_irr = None if wb[0]["irr"] is None else float(np.mean([w["irr"] for w in wb]))
    lines.append(f"| {bb} | {r['attack']} | {pct(m['asr'])} | {pct(m['esr'])} | {pct(m['irr'])} | {pct(m['smr'])} | "
                 f"{m['cos_adv_mean']:.3f} [{m['cos_adv_ci95'][0]:.3f}, {m['cos_adv_ci95'][1]:.3f}] | {pct(wb_asr)} | "
                 f"{pct(wb_irr)} | {pct(m['jpeg50']['asr'])} |")
  for fold, pairs in result.get("paired_difference_meta_auxiliary", {}).items():
    if fold == "what":
      continue
    for pair, d in pairs.items():
      lines.append(f"{fold}: meta_auxiliary - {pair.replace('_vs_', ' vs ')} cos(adv, t): {d['mean']:+.4f} "
                   f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], higher on {d['faces_meta_higher']} of {d['n']} faces")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
