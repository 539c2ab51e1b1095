"""`erasablemask calibrate`: ROC, AUC and FAR thresholds of a face-recognition model on labelled faces.

    erasablemask calibrate --fr DIR --faces FOLDER --identities FILE --out FILE.json [--flip] [--store]
        [--view arcface112 | --view CROP --image-size S | --run WORKDIR]

`--identities` takes an identity file (`<image> <identity>` lines, matched to the images by file stem) or a CSV pair
list (deepface `master.csv`); `--pairs` names a pair list explicitly. Writes the JSON result and a ROC PNG beside it
(`--plot` to choose its path); `--store` writes the thresholds into DIR/card.json, which evaluation reads.

Thresholds belong to a view (`erasablemask_jax.fr.views`). By default (`arcface112`) the faces are ArcFace-aligned
crops embedded as they are. `--view loose_to_arcface --image-size 128` (or `--view none`) reads the faces as training
does (the centre square resized to 128) and embeds them through that crop and resize, so the thresholds match what a run
at 128 with that `fr.input_crop` scores; `--run WORKDIR` takes both from the run's config.json. `--store` files them
under the view's name (e.g. `loose_to_arcface@128`) and the reports use them for that view.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from erasablemask_jax.commands import _args
from erasablemask_jax.commands import _outputs


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser("calibrate", help="ROC / AUC / thresholds at FAR 0.1, 0.01, 0.001 of an FR model",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--fr", required=True,
                 help="converted model directory, 'bundled:mobilefacenet' for the bundled model, or 'shared:NAME' for "
                      "a real model of ../shared/assets (converted once into ~/.cache/erasablemask/fr)")
  p.add_argument("--faces", required=True, help="folder of aligned face images")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--identities", help="identity file '<image> <identity>' (or a CSV pair list, auto-detected)")
  group.add_argument("--pairs", help="CSV pair list: file_x,file_y,Decision (Yes/No) or ...,same_identity (1/0)")
  p.add_argument("--out", required=True, help="output JSON file")
  p.add_argument("--plot", help="ROC PNG path (default: the --out path with .png)")
  p.add_argument("--flip", action="store_true", help="embed as the sum of the image's and its mirror's embeddings")
  p.add_argument("--store", action="store_true", help="write the thresholds into the model directory's card.json")
  p.add_argument("--view", default=None,
                 help="arcface112 (default: ArcFace-aligned crops as they are), or a run's fr.input_crop (none, "
                      "loose_to_arcface) with --image-size")
  p.add_argument("--image-size", type=int, default=None, help="with --view CROP: the run's image_size")
  p.add_argument("--run", default=None,
                 help="training run whose config.json gives the view (fr.input_crop, image_size)")
  p.add_argument("--batch-size", type=_args.positive_int, default=64, help="images per embedding call")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from erasablemask_jax import fr  # pylint: disable=g-import-not-at-top
  from erasablemask_jax.fr import calibration  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  plot = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
  try:
    _outputs.check_writable(out, "--out", is_file=True)  # before the embeddings, not after
    _outputs.check_writable(plot, "--plot", is_file=True)
    if args.fr.startswith("bundled:"):
      if args.store:
        raise calibration.CalibrationError("--store cannot modify the bundled model; copy its directory "
                                           f"({fr.bundled_dir(args.fr.split(':', 1)[1])}) and pass that to --fr")
      recogniser = fr.load_bundled(args.fr.split(":", 1)[1])
    else:
      from erasablemask_jax.fr import real_models  # pylint: disable=g-import-not-at-top
      recogniser = fr.load(real_models.model_dir(args.fr))
    view = calibration.resolve_view(args.view, args.image_size, args.run)
    result = calibration.calibrate(recogniser, args.faces, identities=args.identities, pairs=args.pairs,
                                   flip=args.flip, batch_size=args.batch_size, view=view)
  except (OSError, KeyError, ValueError) as e:
    print(f"erasablemask calibrate: {e}", file=sys.stderr)
    return 1
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  calibration.plot_roc(result, plot)
  summary = ", ".join(f"TAR@FAR{k[4:]} {v:.3f} (thr {result['thresholds'][k]:.3f})"
                      for k, v in result["tar_at_far"].items())
  print(f"view {result['view']}: {result['n_images']} images, {result['n_genuine']} genuine / "
        f"{result['n_impostor']} impostor pairs: "
        f"AUC {result['auc']:.4f}; {summary}")
  extra = f"ROC plot {plot}"
  if args.store:
    directory = recogniser.directory or pathlib.Path(args.fr)  # shared:NAME stores into its cached directory
    calibration.store_thresholds(directory, result)
    extra += f"; thresholds stored in {pathlib.Path(directory) / 'card.json'}"
  print(_outputs.outputs_line("calibrate", out, extra))
  return 0
