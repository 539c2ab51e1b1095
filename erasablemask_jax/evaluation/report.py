"""`evaluate`: the paper's Tables II, V and VI from a trained run, per face-recognition model, with its thresholds.

For faces `x` (the evaluation folder minus the target identity), `att_b = spec(att_a)` (default `roll`, a permutation
within the set as in training), one target identity with images `x_t`:

  x_edit, x_adv = G(x, att_b) (clean edit and protected), x_rec = R(x_adv, att_a)
  x_fgsm, x_pgd = FGSM / PGD (eps 4/255 on [0, 1]) against the run's surrogate ensemble (`metrics.recognition`)

Every generated face is scored as published: x_edit, x_adv, x_fgsm, x_pgd and x_rec are rounded to uint8 (as the PNG
`protect` writes, `image_io.to_uint8`) before any FR model, transform or quality metric sees them, and R restores
the rounded x_adv (its output rounded in turn).

Per FR model f (white-box: one of the run's surrogates; black-box: any other), with L2-normalised embeddings and the
M target images x_t_j, a face's cosine to the target is the mean of its per-target-image cosines
(`metrics.recognition.target_cosine`; the same number as the trainer's `f(x) . t` with `t` the mean of the targets'
unit embeddings):

  cos_k = (1/M) sum_j f(x_k) . f(x_t_j),   ASR_k = mean[cos_k > tau1],   ESR = mean[cos_rec < tau2]

and, against each face's own source (beyond the paper; `metrics.recognition`),

  src_k = f(x_k) . f(x),   SMR_k = mean[src_k > tau1] (k = edit, fgsm, pgd, adv),   IRR = mean[src_rec > tau1]

with tau1, tau2 the model's thresholds at `fr.tau1_far` / `fr.tau2_far` for the view it scores (`fr.input_crop` at the
run's image size, e.g. `loose_to_arcface@128`): its card's calibration of that view, else its arcface112 calibration,
else with `fr.threshold_source="peer_default"` the peers' published one, each labelled in the report
(`fr.thresholds.lookup`); no threshold makes the rates "not available", never a made-up number. The clean face has
no SMR / IRR (its source is itself: both trivially 1). Table V applies each evaluation transform T (seeded:
`rng = fold_in(PRNGKey(seed), index of T)`) to the published x_adv and rounds T(x_adv) to uint8 in turn (the image a
re-encoded, noised or rotated copy of the PNG would be): ASR and SMR of it, ESR and IRR of R(it, att_a) (rounded). Table VI: L1, MSE (on [0, 1]), LPIPS and FID of x_adv against x_edit and of x_rec against x.

Written to the report folder: `report.json`, `report.md`, `embeddings/<model>.npz` (keys `clean`, `edit`, `adv`,
`rec`, `fgsm`, `pgd`, `<T>.adv`, `<T>.rec`: [N, D] unit embeddings, `clean` being the sources; `target`: [M, D];
`tau1`, `tau2`, NaN when uncalibrated: enough to recompute every ASR / ESR / SMR / IRR), `fig4.png` (columns: source,
attribute edit, FGSM, PGD, protected, restored), `table2_asr.png`, `table2_source.png` (SMR, IRR),
`table5_robustness.png`, `table5_source.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from erasablemask_jax import fr
from erasablemask_jax import noise
from erasablemask_jax.data import builders
from erasablemask_jax.data import faces as faces_lib
from erasablemask_jax.data.pipeline import load_face_folder_arrays
from erasablemask_jax.evaluation import render
from erasablemask_jax.evaluation.render import METHODS
from erasablemask_jax.evaluation.render import SOURCE_METHODS
from erasablemask_jax.fr.surrogates import load_surrogate
from erasablemask_jax.fr.surrogates import target_embeddings
from erasablemask_jax.image_io import to_uint8
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.inference import attributes as attributes_lib
from erasablemask_jax.inference.run import Run
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import batching
from erasablemask_jax.metrics import fid as fid_lib
from erasablemask_jax.metrics import lpips as lpips_lib
from erasablemask_jax.metrics import quality
from erasablemask_jax.metrics import recognition
from erasablemask_jax.metrics import remote

log = logging.getLogger(__name__)

EMBED_BATCH = 32


@dataclasses.dataclass
class EvalModel:
  """A face-recognition model scored by the report.

  Attributes:
    key: its unique name in the tables and file names.
    spec: as given (`DIR`, `bundled:NAME` or `shared:NAME`).
    surrogate: the embedding function of faces at the generator's resolution (`fr.surrogates.Surrogate`).
    whitebox: one of the run's training surrogates.
    tau1: ASR threshold, or None when there is none at `fr.tau1_far` (`thresholds`).
    tau2: ESR threshold, or None.
    thresholds: `{"tau1", "tau2"}` -> the `fr.thresholds.Threshold` (value, the view it was calibrated on, its label)
      or None.
  """

  key: str
  spec: str
  surrogate: Any
  whitebox: bool
  tau1: float | None
  tau2: float | None
  thresholds: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def view(self) -> str | None:
    return self.surrogate.view


@functools.lru_cache(maxsize=16)
def _load_surrogate(spec: str, input_crop: str, image_size: int):
  """`fr.surrogates.load_surrogate`, memoised: a model scored and attacked in one process is loaded (and its
  jitted functions compiled) once."""
  return load_surrogate(spec, input_crop, image_size)


def _source_id(spec: str) -> str:
  from erasablemask_jax.fr import real_models  # pylint: disable=g-import-not-at-top
  return str(real_models.model_dir(spec).resolve())


def load_eval_models(fr_specs: Sequence[str], blackbox_specs: Sequence[str], config,
                     threshold_source: str | None = None) -> list[EvalModel]:
  """Loads the FR models to score; `fr_specs` are white-box when the run trained against them, `blackbox_specs`
  are always marked black-box. Each sees faces through `config.fr.input_crop`, as the attack did, and takes its
  thresholds for that view (`threshold_source`, default the run's `fr.threshold_source`: `fr.thresholds.lookup`)."""
  trained = set()
  for s in config.fr.surrogates:
    try:
      trained.add(_source_id(s))
    except KeyError:
      pass
  models, keys = [], set()
  for spec, forced_black in [(s, False) for s in fr_specs] + [(s, True) for s in blackbox_specs]:
    surrogate = _load_surrogate(spec, config.fr.input_crop, int(config.image_size))
    recogniser = surrogate.recogniser
    key = recogniser.name + ("@flip" if spec.endswith("@flip") else "")
    while key in keys:
      key += "'"
    keys.add(key)
    found = surrogate.taus(config.fr, threshold_source)
    for name, t in found.items():
      if t is None:
        log.warning("%s has no threshold at FAR %g for view %s (views calibrated: %s): its rates that need %s are "
                    "not available; run `erasablemask calibrate --run WORKDIR --store`", spec,
                    config.fr[f"{name}_far"], surrogate.view, sorted(recogniser.thresholds_by_view), name)
      elif t.kind != "calibrated":
        log.warning("%s, view %s: %s is %.4f (%s)", spec, surrogate.view, name, t.value, t.label)
    models.append(EvalModel(key=key, spec=spec, surrogate=surrogate,
                            whitebox=not forced_black and _source_id(spec) in trained,
                            tau1=None if found["tau1"] is None else found["tau1"].value,
                            tau2=None if found["tau2"] is None else found["tau2"].value, thresholds=found))
  return models


def _embed(model: EvalModel, images: np.ndarray) -> np.ndarray:
  fn = jax.jit(model.surrogate.apply)
  variables = model.surrogate.variables
  return batching.map_in_batches(lambda a: fn(variables, a), EMBED_BATCH, np.asarray(images, np.float32))


def published(images: np.ndarray) -> np.ndarray:
  """Float [-1, 1] faces as a user publishes them: rounded to the uint8 PNG `protect` writes, back in [-1, 1]."""
  return uint8_to_minus1_1(to_uint8(images))


def protect_and_restore(run: Run, x: np.ndarray, att_a: np.ndarray, att_b: np.ndarray) -> dict[str, np.ndarray]:
  """`{"edit", "adv", "rec"}` as published: x_edit, x_adv rounded, and R(rounded x_adv, att_a) rounded."""
  x_adv, x_edit = run.protect(x, att_b)
  x_adv = published(x_adv)
  return {"edit": published(x_edit), "adv": x_adv, "rec": published(run.restore(x_adv, att_a))}


def _rate(fn, cos: np.ndarray, tau: float | None, what: str):
  if tau is None:
    return availability.Unavailable(f"no threshold for {what} (view not calibrated); run `erasablemask calibrate "
                                    "--run WORKDIR --store`, or set fr.threshold_source=peer_default")
  return fn(cos, tau)


def _protected_rates(cos, src, adv: str, rec: str, m: EvalModel) -> dict[str, Any]:
  return {"asr": _rate(recognition.attack_success_rate, cos[adv], m.tau1, "ASR"),
          "esr": _rate(recognition.erasure_success_rate, cos[rec], m.tau2, "ESR"),
          "smr": _rate(recognition.source_match_rate, src[adv], m.tau1, "SMR"),
          "irr": _rate(recognition.identity_recovery_rate, src[rec], m.tau1, "IRR")}


def _table2_rows(cos: dict[str, np.ndarray], src: dict[str, np.ndarray], m: EvalModel,
                 baselines: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Table II's rows of one model from the cosines to the target (`cos`) and to each face's source (`src`)."""
  rows = {}
  for method in METHODS:
    kind = "adv" if method == "erasablemask" else method
    if kind not in cos:
      reason = baselines[method]
      rows[method] = {"asr": reason, "mean_cos": reason, "smr": reason, "mean_cos_source": reason}
      continue
    rows[method] = {"asr": _rate(recognition.attack_success_rate, cos[kind], m.tau1, "ASR"),
                    "mean_cos": float(cos[kind].mean())}
    if method in SOURCE_METHODS:
      rows[method]["smr"] = _rate(recognition.source_match_rate, src[kind], m.tau1, "SMR")
      rows[method]["mean_cos_source"] = float(src[kind].mean())
  rows["erasablemask"].update(_protected_rates(cos, src, "adv", "rec", m))
  rows["erasablemask"]["mean_cos_restored"] = float(cos["rec"].mean())
  rows["erasablemask"]["mean_cos_restored_source"] = float(src["rec"].mean())
  rows["clean"]["esr"] = _rate(recognition.erasure_success_rate, cos["clean"], m.tau2, "ESR")
  return rows


def _faces(run: Run, data_dir: str, target: str, identities: Sequence[int] | None, max_faces: int | None):
  """Evaluation faces {image, att, file, identity} and target images (uint8), from the folder and the target spec."""

  if not target:
    raise ValueError("no target identity: the run's config has no fr.target; pass --target IMAGE|DIR|identity:K")
  arrays = load_face_folder_arrays(data_dir, run.image_size)
  target_images, target_mask = faces_lib.target_faces(target, arrays, run.image_size, data_dir)
  keep = ~target_mask
  if identities:
    keep &= np.isin(arrays["identity"], np.asarray(identities))
  index = np.flatnonzero(keep)[:max_faces] if max_faces else np.flatnonzero(keep)
  if len(index) < 2:
    raise ValueError(f"{len(index)} evaluation face(s) left in {data_dir} after removing the target identity and "
                     "filtering; the report needs at least 2")
  return faces_lib.subset(arrays, index), target_images


def _faces_att_a(run: Run, data_dir: str, faces: dict) -> tuple[np.ndarray, str]:

  folder = builders.resolve_manual_dir(data_dir)
  if (folder / "attributes.csv").is_file():
    return faces["att"].astype(np.float32), "attributes.csv"
  return attributes_lib.predicted(run.attribute_logits(uint8_to_minus1_1(faces["image"]))), "d_att"


def attack_baselines(x: np.ndarray, x_t: np.ndarray, surrogates: Sequence[Any], pgd_steps: int = 20,
                     epsilon: float = recognition.EPSILON) -> dict[str, np.ndarray]:
  """Table II's FGSM and PGD faces: targeted impersonation of `x_t` against the surrogate ensemble.

  Args:
    x: float [N, S, S, 3] faces in [-1, 1].
    x_t: float [M, S, S, 3] target images; each surrogate's target is the mean of their unit embeddings.
    surrogates: `fr.surrogates.Surrogate`s (their `apply` sees the faces as the attack did).
    pgd_steps: PGD iterations (step `2.5 eps / steps`, started at x).
    epsilon: L_inf budget on [-1, 1].

  Returns:
    {"fgsm": x_fgsm, "pgd": x_pgd}, numpy float32.
  """

  targets = target_embeddings(surrogates, x_t)
  fns = [jax.tree_util.Partial(s.apply, s.variables) for s in surrogates]
  return {"fgsm": np.asarray(recognition.fgsm(x, fns, targets, epsilon)),
          "pgd": np.asarray(recognition.pgd(x, fns, targets, epsilon, num_steps=pgd_steps))}


def _baselines(run: Run, x: np.ndarray, x_t: np.ndarray, surrogate_specs: Sequence[str], pgd_steps: int,
               epsilon: float) -> dict[str, np.ndarray | availability.Unavailable]:
  """FGSM and PGD against the run's surrogates (the same views of the faces the attack trained against)."""
  if not surrogate_specs:
    reason = availability.Unavailable("the run has no surrogates (fr.surrogates); pass --surrogates")
    return {"fgsm": reason, "pgd": reason}
  surrogates = [_load_surrogate(s, run.config.fr.input_crop, run.image_size) for s in surrogate_specs]
  return attack_baselines(x, x_t, surrogates, pgd_steps, epsilon)


def _transformed(run: Run, x_adv: np.ndarray, att_a: np.ndarray, transforms: Sequence[str], seed: int):

  out = {}
  for i, name in enumerate(transforms):
    try:
      fn = noise.get_eval_transform(name)
      adv_t = published(np.asarray(fn(jax.numpy.asarray(x_adv), jax.random.fold_in(jax.random.PRNGKey(seed), i))))
    except ValueError as e:
      out[name] = availability.Unavailable(f"{name} does not apply to {x_adv.shape[1]}x{x_adv.shape[2]} faces: {e}")
      continue
    out[name] = {"adv": adv_t, "rec": published(run.restore(adv_t, att_a))}
  return out


def _quality(images: dict[str, np.ndarray], lpips_weights, lpips_net: str, fid_weights) -> dict[str, dict]:

  lpips_metric = lpips_lib.load_lpips(lpips_net, lpips_weights)  # no weights given: the `metrics` extra's
  inception = fid_lib.load_inception(fid_weights)
  vgg16 = fid_lib.load_vgg16_features()
  table = {}
  for row, (a, b) in {"protected_vs_edit": ("adv", "edit"), "restored_vs_source": ("rec", "clean")}.items():
    xa, xb = images[a], images[b]
    table[row] = {"l1": quality.l1(xa, xb), "mse": quality.mse(xa, xb),
                  "lpips": lpips_lib.mean_lpips(lpips_metric, xa, xb), "fid": fid_lib.fid(xa, xb, inception),
                  "fd_vgg16": fid_lib.fd_vgg16(xa, xb, vgg16)}  # FD-VGG16, not comparable to FID (metrics.fid)
  return table


def _remote(client, images: dict[str, np.ndarray], x_t: np.ndarray) -> dict[str, Any]:
  """Each clean, protected and restored face against the first target image, through `client` (a
  `metrics.remote.RemoteFaceCompare`). A face the service finds no face in scores NaN and is counted in `no_face`;
  when the service reports its own thresholds (Face++), the share of faces at or above each is recorded too."""
  target = to_uint8(x_t[0])
  out = {"url": client.url, "target": "the first target image"}
  for kind in ("clean", "adv", "rec"):
    conf = client.compare_many((to_uint8(im), target) for im in images[kind])
    found = conf[~np.isnan(conf)]
    out[kind] = {"mean_confidence": float(found.mean()) if found.size else None, "no_face": int(conf.size - found.size),
                 "confidence": [None if np.isnan(c) else float(c) for c in conf]}  # None, not NaN: strict JSON
  if client.thresholds:
    out["thresholds"] = dict(client.thresholds)
    for kind in ("clean", "adv", "rec"):
      conf = np.asarray([np.nan if c is None else c for c in out[kind]["confidence"]], np.float64)
      out[kind]["at_or_above"] = {k: float(np.mean(conf >= v)) for k, v in client.thresholds.items()}
  out["requests"] = client.requests_made
  return out


def evaluate(run: Run, data_dir: str, models: Sequence[EvalModel], out_dir: str | os.PathLike[str],
             **options) -> dict[str, Any]:
  """Computes the report (module docstring) and writes it to `out_dir`; returns the JSON-ready dict.

  `compute_tables(run, data_dir, models, **options)` then `render.write_report(out_dir, tables)`; `out_dir` is the report
  folder (created; existing report files are replaced).
  """
  tables = compute_tables(run, data_dir, models, **options)
  render.write_report(out_dir, tables)
  return tables["report"]


def compute_tables(run: Run, data_dir: str, models: Sequence[EvalModel], *, transforms: Sequence[str] | None = None,
                   seed: int = 0, attrs: str = "roll", target: str | None = None,
                   identities: Sequence[int] | None = None, max_faces: int | None = None,
                   surrogates: Sequence[str] | None = None, pgd_steps: int = 20, epsilon: float = recognition.EPSILON,
                   lpips_weights=None, lpips_net: str = "alex", fid_weights=None, remote_url: str | None = None,
                   remote_rate: float | None = 2.0, remote_client=None) -> dict[str, Any]:
  """Tables II, V and VI (module docstring) for a run; nothing is written.

  Args:
    run: the loaded run.
    data_dir: evaluation face folder (with `attributes.csv` and identities), or `bundled:sample_faces`.
    models: FR models to score (`load_eval_models`).
    transforms: Table V transform names (default: the run's `noise.eval_transforms`).
    seed: seeds the random transforms.
    attrs: att_b spec (`attributes` module).
    target: target identity (default the run's `fr.target`): `identity:K` of `data_dir`, an image or a folder.
    identities: evaluate only faces of these identities.
    max_faces: evaluate at most this many faces.
    surrogates: FR specs for the FGSM / PGD ensemble (default: the run's `fr.surrogates`).
    pgd_steps: PGD iterations.
    epsilon: FGSM / PGD L_inf budget on [-1, 1] (default 8/255 = 4/255 on [0, 1]).
    lpips_weights, lpips_net, fid_weights: metric weights (`metrics.lpips.load_lpips`, `metrics.fid.load_inception`);
      None makes those columns "not available".
    remote_url: score clean, protected and restored faces through this face-compare endpoint too.
    remote_rate: the remote client's request rate limit (None: unlimited).
    remote_client: a ready `metrics.remote.RemoteFaceCompare` (a preset such as Face++) instead of `remote_url`.

  Returns:
    `{"report": the JSON-ready tables, "images": the published faces by kind (float [-1, 1]), "embeddings": {model
    key: {name: array}} (each model's embeddings of every kind, its target embeddings and thresholds)}`.
  """
  config = run.config
  transforms = tuple(config.noise.eval_transforms if transforms is None else transforms)
  target = str(config.fr.target) if target is None else target
  faces, target_images = _faces(run, data_dir, target, identities, max_faces)
  att_a, att_a_source = _faces_att_a(run, data_dir, faces)
  att_b = attributes_lib.parse_spec(attrs).apply(att_a)
  x, x_t = uint8_to_minus1_1(faces["image"]), uint8_to_minus1_1(target_images)
  images = {"clean": x, **protect_and_restore(run, x, att_a, att_b)}
  baselines = _baselines(run, x, x_t, tuple(config.fr.surrogates if surrogates is None else surrogates), pgd_steps,
                         epsilon)
  images.update({k: published(v) for k, v in baselines.items() if not isinstance(v, availability.Unavailable)})
  robust = _transformed(run, images["adv"], att_a, transforms, seed)

  table2, table5, model_info, embeddings = {}, {}, {}, {}
  for m in models:
    emb = {k: _embed(m, v) for k, v in images.items()}
    for name, r in robust.items():
      if not isinstance(r, availability.Unavailable):
        emb[f"{name}.adv"], emb[f"{name}.rec"] = _embed(m, r["adv"]), _embed(m, r["rec"])
    target_emb = _embed(m, x_t)
    cos = {k: recognition.target_cosine(e, target_emb) for k, e in emb.items()}  # mean over the target images
    src = {k: np.sum(e * emb["clean"], axis=1) for k, e in emb.items()}  # each face against its own source
    table2[m.key] = _table2_rows(cos, src, m, baselines)
    t5 = {"none": {k: table2[m.key]["erasablemask"][k] for k in ("asr", "esr", "smr", "irr")}}
    for name, r in robust.items():
      if isinstance(r, availability.Unavailable):
        t5[name] = {"asr": r, "esr": r, "smr": r, "irr": r}
      else:
        t5[name] = _protected_rates(cos, src, f"{name}.adv", f"{name}.rec", m)
    table5[m.key] = t5
    model_info[m.key] = {"spec": m.spec, "whitebox": m.whitebox, "tau1": m.tau1, "tau2": m.tau2,
                         "tau1_far": float(config.fr.tau1_far), "tau2_far": float(config.fr.tau2_far),
                         "view": m.view, "thresholds": {k: None if t is None else t.to_json()
                                                        for k, t in m.thresholds.items()},
                         "embeddings": f"embeddings/{m.key}.npz"}
    embeddings[m.key] = {"target": target_emb, "tau1": np.float64(np.nan if m.tau1 is None else m.tau1),
                         "tau2": np.float64(np.nan if m.tau2 is None else m.tau2), **emb}

  report = {
      "run": run.checkpoint_info(), "data": str(data_dir), "faces": faces["file"], "target": target,
      "target_images": int(len(x_t)), "image_size": run.image_size, "attrs": attrs, "att_a_source": att_a_source,
      "seed": seed, "transforms": list(transforms), "epsilon": epsilon, "pgd_steps": pgd_steps,
      "surrogates": list(config.fr.surrogates if surrogates is None else surrogates), "models": model_info,
      "table2": table2, "table5": table5,
      "table6": _quality(images, lpips_weights, lpips_net, fid_weights),
  }
  if remote_client is None and remote_url:
    remote_client = remote.RemoteFaceCompare(remote_url, max_requests_per_s=remote_rate)
  if remote_client is not None:
    report["remote"] = _remote(remote_client, images, x_t)
  return {"report": _jsonable(report), "images": images, "embeddings": embeddings}


def _jsonable(value):
  if isinstance(value, availability.Unavailable):
    return availability.to_json(value)
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value
