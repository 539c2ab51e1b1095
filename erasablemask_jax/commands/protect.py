"""`erasablemask protect --workdir RUN --in DIR --out DIR [--attrs SPEC] [--force]`: protected PNGs + JSON sidecars.

att_b (`--attrs`): `flip:NAME[,NAME]` (default flip:Eyeglasses), `set:NAME=0|1[,...]`, `bits:<13 digits>` or `roll`.
att_a: from DIR/attributes.csv where it lists the file, else the discriminator's prediction (recorded per sidecar).
Images are centre-cropped and resized to the run's resolution; unreadable files are skipped with the reason.
"""

from __future__ import annotations

import argparse

from erasablemask_jax.commands import _folders


def register(subparsers) -> None:
  p = subparsers.add_parser("protect", help="protect a folder of faces (PNG + JSON sidecar per image)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _folders.add_run_and_folder_args(p, workdir_help="the trained run (its config.json and checkpoints)",
                                   in_help="folder of face images (recursive)",
                                   out_help="output folder for protected PNGs and sidecars")
  p.add_argument("--attrs", default=None, help="how att_b is chosen (default flip:Eyeglasses); see above")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.inference import attributes  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import folders  # pylint: disable=import-outside-toplevel

  spec = args.attrs or attributes.DEFAULT_PROTECT_SPEC
  return _folders.run_on_folder("protect", args,
                                lambda loaded: folders.protect_folder(loaded, args.in_dir, args.out, spec,
                                                                      force=args.force),
                                check=lambda: attributes.parse_spec(spec),
                                outputs="a PNG and a JSON sidecar per image")
