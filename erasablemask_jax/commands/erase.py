"""`erasablemask erase --workdir RUN --in DIR --out DIR [--source-attrs ...] [--force]`: restore protected faces.

Photos written by `erasablemask protect`: each face is taken through the transform its sidecar records (scaled if the
photo was resized since, as a sharing site does), restored by the run's restorer, x_rec = R(x_adv, att_a), and its
change put back the same way; the restored photo has the original's size and, outside the faces, its pixels.

Aligned crops (`protect --aligned`; chosen automatically when the folder holds no photo sidecar, or with `--aligned`):
each protected PNG is restored whole. Without sidecars, `--source-attrs` gives att_a for crops: `bits:<13 digits>`
for every image, a CSV (attributes.csv format, `file` = the protected image's path relative to --in), or
`predicted[:NAME,...]`: D_att's prediction on the protected face with the flipped attributes (named here, or from the
sidecar) inverted, an approximation.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from erasablemask_jax.commands import _folders


def register(subparsers) -> None:
  p = subparsers.add_parser("erase", help="restore protected photos (or crops) with R, from each JSON sidecar",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _folders.add_run_and_folder_args(p, workdir_help="the trained run that protected the faces",
                                   in_help="folder written by `erasablemask protect`",
                                   out_help="output folder for restored PNGs")
  p.add_argument("--aligned", action="store_true", help="the folder holds protected aligned crops (protect --aligned)")
  p.add_argument("--source-attrs", default=None,
                 help="att_a of aligned crops without sidecars: bits:..., FILE.csv or predicted[:NAMES]")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.inference import folders  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import photos  # pylint: disable=import-outside-toplevel

  if not args.aligned and pathlib.Path(args.in_dir).is_dir() and photos.is_photo_folder(args.in_dir):
    if args.source_attrs:
      print("erasablemask erase: --source-attrs applies to aligned crops; a photo's faces need its sidecar (their "
            "transforms), so drop --source-attrs", file=sys.stderr)
      return 2
    return _folders.run_on_folder("erase", args,
                                  lambda loaded: photos.erase_photos(loaded, args.in_dir, args.out, force=args.force),
                                  outputs="a restored PNG per photo, at its own size")
  return _folders.run_on_folder("erase", args,
                                lambda loaded: folders.erase_folder(loaded, args.in_dir, args.out, args.source_attrs,
                                                                    force=args.force),
                                outputs="a restored PNG per image")
