"""The transfer study's data, models and scoring (`benchmarks/transfer_study.py` drives it; `benchmarks/score_run.py`
scores any run with it).

- data: the 296 CelebA photos of 74 identities, aligned by our MTCNN to loose crops, 13 attributes each;
- models: the six real FR models of `../shared/assets` in three formats, converted once into the study's workdir;
- thresholds: each model's genuine/impostor ROC on all 296 crops through the view it gets in training and evaluation
  (tau1 at FAR 0.01, tau2 at FAR 0.1);
- scoring, per run and FR model, on the held-out faces rounded to uint8 as `protect` publishes them: ASR, ESR, IRR,
  SMR, mean cos(x_adv, target) with a bootstrap 95% CI over faces, the rates again after libjpeg JPEG quality 50, L1 /
  MSE / LPIPS (AlexNet) of x_adv vs x_cov^{att_b} and of x_rec vs x_cov, and a diagnosis of where ESR and IRR are
  lost; the clean, attribute-edit, FGSM and PGD (4/255) baselines against the same surrogates.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = pathlib.Path(os.environ.get("ERASABLEMASK_ASSETS", REPO.parent / "shared" / "assets"))
CELEBA = ASSETS / "images" / "celeba_wild_identities"
# The six real FR models in three formats (`fr.real_models`, `shared:NAME`): foamliu and Xiaoccer MobileFaceNets
# (PyTorch), becauseofAI MobileFace V2 (MXNet) and V3 (TF.js), HSE's faceres and faceres-deep (TF.js). MobileFace V2 / V3
# are MobileNetV2-style cousins of the MobileFaceNets; faceres and faceres-deep (two checkpoints of one MobileNet-v1
# trained on VGGFace2) are the other family.
MODELS = ("foamliu", "xiaoccer", "mobileface_v2", "mobileface_v3", "faceres", "faceres_deep")


def family(name: str) -> str:
  from erasablemask_jax.fr import real_models

  return real_models.REAL_MODELS[name].family


def spec(name: str) -> str:
  """The model spec the trainer and the scorer load (`bundled:` for the packaged foamliu net, else `shared:`)."""
  return "bundled:mobilefacenet" if name == "foamliu" else f"shared:{name}"


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


def prepare_models(names=None) -> dict[str, str]:
  """`{name: model spec}` of `names` (default: all six), each converted into `fr.real_models`' cache first."""
  from erasablemask_jax.fr import real_models

  names = list(names or MODELS)
  for name in names:
    real_models.model_dir(spec(name))
  return {name: spec(name) for name in names}


class Embedded(NamedTuple):
  """One FR model's embeddings of every aligned face, through one view."""
  input_size: tuple[int, int]
  embeddings: np.ndarray  # (N, D)


def embed_faces(specs: dict[str, str], faces: dict[str, np.ndarray], view: str) -> dict[str, Embedded]:
  """Each model's embeddings of every aligned face through `view` (the view it gets in training), computed once for
  `calibrate_views` and `clean_esr_by_target`."""
  from erasablemask_jax.fr import calibration

  out = {}
  for name, model_spec in specs.items():
    recogniser = load_recogniser(model_spec)
    out[name] = Embedded(tuple(recogniser.input_size), calibration.embed_view(recogniser, list(faces["image"]), view))
  return out


def calibrate_views(embedded: dict[str, Embedded], identity: np.ndarray, view: str) -> dict[str, dict]:
  """ROC of each FR model on every aligned face through the view it gets in training (thresholds per view)."""
  from erasablemask_jax.fr import calibration

  stems = [str(i) for i in range(len(identity))]
  genuine, impostor = calibration.pairs_from_identities(stems, dict(zip(stems, np.asarray(identity).tolist())))
  out = {}
  for name, e in embedded.items():
    m = calibration.metrics_from_embeddings(e.embeddings, genuine, impostor, fars=(0.1, 0.01, 0.001))
    out[name] = {"view": view, "input_size": list(e.input_size), "auc": m["auc"],
                 "tar_at_far": m["tar_at_far"], "thresholds": m["thresholds"], "n_images": len(stems),
                 "n_genuine": int(len(genuine)), "n_impostor": int(len(impostor))}
  return out


def clean_esr_by_target(embedded: dict[str, Embedded], identity: np.ndarray, calibration: dict, eval_ids: list[int],
                        tau2_far: float) -> dict[int, dict[str, float]]:
  """For every identity that could be the target (two faces or more, not held out): per model, the ESR of the
  untouched held-out faces against it, the fraction whose cosine to its faces (`recognition.target_cosine`) is under
  the model's tau2. It is the ceiling of ESR an exact restorer reaches with that target (`study_report.clean_esr`),
  known before any training."""
  from erasablemask_jax.metrics import recognition

  identity = np.asarray(identity)
  held_out = np.isin(identity, np.asarray(eval_ids))
  candidates = [int(i) for i in np.unique(identity) if int(i) not in eval_ids and np.sum(identity == i) >= 2]
  out: dict[int, dict[str, float]] = {c: {} for c in candidates}
  for name, e in embedded.items():
    tau2 = calibration[name]["thresholds"][f"far_{tau2_far:g}"]
    for c in candidates:
      cos = recognition.target_cosine(e.embeddings[held_out], e.embeddings[identity == c])
      out[c][name] = recognition.erasure_success_rate(cos, tau2)
  return out


def load_recogniser(model_spec: str):
  from erasablemask_jax import fr
  from erasablemask_jax.fr import real_models

  return fr.load(real_models.model_dir(model_spec))



# ---------------------------------------------------------------------------------------------------------------------
# Scoring


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


def make_scorer(config, specs: dict[str, str], calibration: dict, bootstrap: int, seed: int):
  """`(scorer, splits)`: a Scorer with the study's `calibration` and `config`'s thresholds, and the face splits of
  `config` (whose `target` it scores against and whose `eval` faces it scores)."""
  from erasablemask_jax.data.faces import load_face_splits  # pylint: disable=g-import-not-at-top

  splits = load_face_splits(config.data, config.fr, config.image_size)
  scorer = Scorer(specs, config.fr.input_crop, config.image_size, splits.target, calibration,
                  config.fr.tau1_far, config.fr.tau2_far, bootstrap, seed)
  return scorer, splits


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
  """Protect -> uint8 -> restore -> uint8 on the held-out faces; every FR model's rates, the image quality of both
  outputs and the `diagnose` figures. Returns (entry, images)."""
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
           "diagnosis": diagnosis(scorer, source, out["rec"], restore(source)),
           "step": run.step}
  return entry, {"source": source, **out}


def downscaled(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 faces resized to `size` and back (bilinear, antialiased): what a blurrier reconstruction keeps at best."""
  x = jnp.asarray(to_float(images))
  n, h, w, c = x.shape
  small = jax.image.resize(x, (n, size, size, c), "linear", antialias=True)
  return to_uint8(np.asarray(jax.image.resize(small, (n, h, w, c), "linear")))


def diagnosis(scorer: Scorer, source: np.ndarray, rec: np.ndarray, rec_clean: np.ndarray) -> dict[str, Any]:
  """Where identity recovery and erasure are won or lost, per FR model (`transfer_study --diagnose` prints it):

  - `cos_rec_source`: cos(R(x_adv), x_cov), the restored face against the source (IRR's cosine);
  - `cos_rec_clean_source`: cos(R(x_cov), x_cov), R on the unprotected face: R's own fidelity, the ceiling for the
    first when the perturbation is fully erased;
  - `cos_down64_source`: cos of a 64-px downscale of the source against the source: what a blurry but faithful
    reconstruction keeps;
  - `cos_rec_target` / `cos_rec_clean_target` and `tau2`: the restored faces' cosine to the target (ESR fails where it
    is above tau2), and the same for R(x_cov): the part of the target match that R leaves from the perturbation is
    the difference; `esr_lost` lists the faces (by index) that fail ESR.
  """
  from erasablemask_jax.metrics import recognition

  down = downscaled(source, 64)
  out = {}
  for name in scorer.surrogates:
    e_src = scorer.embed(name, source)
    e_rec, e_clean, e_down = scorer.embed(name, rec), scorer.embed(name, rec_clean), scorer.embed(name, down)
    cos_rec_t = recognition.target_cosine(e_rec, scorer.target[name])
    out[name] = {
        "cos_rec_source": float(np.mean(recognition.cosine(e_rec, e_src))),
        "cos_rec_clean_source": float(np.mean(recognition.cosine(e_clean, e_src))),
        "cos_down64_source": float(np.mean(recognition.cosine(e_down, e_src))),
        "cos_rec_target": float(np.mean(cos_rec_t)),
        "cos_rec_clean_target": float(np.mean(recognition.target_cosine(e_clean, scorer.target[name]))),
        "tau2": scorer.tau2[name], "esr_lost": [int(i) for i in np.flatnonzero(cos_rec_t >= scorer.tau2[name])]}
  return out


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
