"""`erasablemask erase --workdir RUN --in DIR --out DIR [--source-attrs ...] [--force]`: restore protected faces.

Each protected PNG is restored by the run's restorer, x_rec = R(x_adv, att_a), with att_a from its JSON sidecar.
Without sidecars, `--source-attrs` gives att_a: `bits:<13 digits>` for every image, a CSV (attributes.csv format,
`file` = the protected image's path relative to --in), or `predicted[:NAME,...]`: D_att's prediction on the
protected face with the flipped attributes (named here, or from the sidecar) inverted, an approximation.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  p = subparsers.add_parser("erase", help="restore protected faces with R (reads each JSON sidecar)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the trained run that protected the faces")
  p.add_argument("--in", dest="in_dir", required=True, help="folder written by `erasablemask protect`")
  p.add_argument("--out", required=True, help="output folder for restored PNGs")
  p.add_argument("--source-attrs", default=None, help="att_a without sidecars: bits:..., FILE.csv or predicted[:NAMES]")
  p.add_argument("--force", action="store_true", help="overwrite existing outputs")
  p.add_argument("--batch-size", type=int, default=16, help="images per jitted call")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.data.labels import LabelFileError  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import attributes  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import folders  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.evaluation import inference  # pylint: disable=import-outside-toplevel

  try:
    loaded = inference.load_run(args.workdir, args.step, args.batch_size)
    result = folders.erase_folder(loaded, args.in_dir, args.out, args.source_attrs, force=args.force)
  except (FileNotFoundError, FileExistsError, LabelFileError, attributes.AttributeSpecError) as e:
    print(f"erasablemask erase: {e}", file=sys.stderr)
    return 1
  print(f"erase: {result.summary()}")
  return 0 if result.written else 1
