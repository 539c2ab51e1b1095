"""`erasablemask erase --workdir RUN --in DIR --out DIR [--source-attrs ...] [--force]`: restore protected faces.

Each protected PNG is restored by the run's restorer, x_rec = R(x_adv, att_a), with att_a from its JSON sidecar.
Without sidecars, `--source-attrs` gives att_a: `bits:<13 digits>` for every image, a CSV (attributes.csv format,
`file` = the protected image's path relative to --in), or `predicted[:NAME,...]`: D_att's prediction on the
protected face with the flipped attributes (named here, or from the sidecar) inverted, an approximation.
"""

from __future__ import annotations

import argparse

from erasablemask_jax.commands import _folders


def register(subparsers) -> None:
  p = subparsers.add_parser("erase", help="restore protected faces with R (reads each JSON sidecar)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _folders.add_run_and_folder_args(p, workdir_help="the trained run that protected the faces",
                                   in_help="folder written by `erasablemask protect`",
                                   out_help="output folder for restored PNGs")
  p.add_argument("--source-attrs", default=None, help="att_a without sidecars: bits:..., FILE.csv or predicted[:NAMES]")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.inference import folders  # pylint: disable=import-outside-toplevel

  return _folders.run_on_folder("erase", args,
                                lambda loaded: folders.erase_folder(loaded, args.in_dir, args.out, args.source_attrs,
                                                                    force=args.force),
                                outputs="a restored PNG per image")
