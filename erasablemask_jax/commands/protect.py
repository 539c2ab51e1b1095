"""`erasablemask protect --workdir RUN --in DIR --out DIR [--attrs SPEC] [--force]`: protected PNGs + JSON sidecars.

att_b (`--attrs`): `flip:NAME[,NAME]` (default flip:Eyeglasses), `set:NAME=0|1[,...]`, `bits:<13 digits>` or `roll`.
att_a: from DIR/attributes.csv where it lists the file, else the discriminator's prediction (recorded per sidecar).
Images are centre-cropped and resized to the run's resolution; unreadable files are skipped with the reason.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  p = subparsers.add_parser("protect", help="protect a folder of faces (PNG + JSON sidecar per image)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the trained run (its config.json and checkpoints)")
  p.add_argument("--in", dest="in_dir", required=True, help="folder of face images (recursive)")
  p.add_argument("--out", required=True, help="output folder for protected PNGs and sidecars")
  p.add_argument("--attrs", default=None, help="how att_b is chosen (default flip:Eyeglasses); see above")
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
    attributes.parse_spec(args.attrs or attributes.DEFAULT_PROTECT_SPEC)
    loaded = inference.load_run(args.workdir, args.step, args.batch_size)
    result = folders.protect_folder(loaded, args.in_dir, args.out, args.attrs or attributes.DEFAULT_PROTECT_SPEC,
                                    force=args.force)
  except (FileNotFoundError, FileExistsError, LabelFileError, attributes.AttributeSpecError) as e:
    print(f"erasablemask protect: {e}", file=sys.stderr)
    return 1
  print(f"protect: {result.summary()}")
  return 0 if result.written else 1
