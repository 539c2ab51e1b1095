"""`erasablemask protect --workdir RUN --in DIR --out DIR [--attrs SPEC] [--force]`: protect the faces of photos.

Photos (the default): every face our MTCNN finds (all, or `--largest-face`; faces below `--min-face-size` px are
skipped with their size) is aligned to the run's template, protected at the run's resolution, and its change put back
into the photo at the photo's own size through a feathered mask (`erasablemask_jax.inference.paste`): pixels outside
the faces are the photo's own. Output: `OUT/<name>.png` (lossless, the default) or `--format jpeg --quality Q`, EXIF
orientation applied, and a JSON sidecar per photo (each face's box, landmarks, transform, att_a, att_b, the checkpoint
fingerprint) that `erasablemask erase` needs. A photo without a face is one summary line ("no face found"), copied
unchanged only with `--copy-unprotected`.

`--aligned`: the inputs are already-aligned face crops (the bundled sample faces, CelebA crops): each is centre-cropped
and resized to the run's resolution and written at that size, as before.

att_b (`--attrs`): `flip:NAME[,NAME]` (default flip:Eyeglasses), `set:NAME=0|1[,...]`, `bits:<13 digits>` or `roll`.
att_a: from DIR/attributes.csv where it lists the file (photos: with one face), else the discriminator's prediction.
"""

from __future__ import annotations

import argparse
import sys

from erasablemask_jax.commands import _args
from erasablemask_jax.commands import _folders

PHOTO_FLAGS = {"largest_face": "--largest-face", "min_face_size": "--min-face-size", "format": "--format",
               "quality": "--quality", "copy_unprotected": "--copy-unprotected"}


def register(subparsers) -> None:
  p = subparsers.add_parser("protect", help="protect the faces of photos (same-size photo + JSON sidecar each)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _folders.add_run_and_folder_args(p, workdir_help="the trained run (its config.json and checkpoints)",
                                   in_help="folder of photos (recursive)",
                                   out_help="output folder for protected photos and sidecars")
  p.add_argument("--attrs", default=None, help="how att_b is chosen (default flip:Eyeglasses); see above")
  p.add_argument("--aligned", action="store_true",
                 help="the inputs are aligned face crops: write each at the run's resolution (no detection)")
  p.add_argument("--largest-face", action="store_true", default=None, help="protect only the largest face per photo")
  p.add_argument("--min-face-size", type=_args.positive_float, default=None,
                 help="skip faces smaller than this many pixels (default 40)")
  p.add_argument("--format", choices=("png", "jpeg"), default=None, help="output format (default png, lossless)")
  p.add_argument("--quality", type=_args.positive_int, default=None, help="JPEG quality 1..95 (default 95)")
  p.add_argument("--copy-unprotected", action="store_true", default=None,
                 help="copy photos without a face to --out unchanged (default: skip them)")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.inference import attributes  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import folders  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import photos  # pylint: disable=import-outside-toplevel

  spec = args.attrs or attributes.DEFAULT_PROTECT_SPEC
  given = [flag for key, flag in PHOTO_FLAGS.items() if getattr(args, key) is not None]
  if args.aligned:
    if given:
      print(f"erasablemask protect: {', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to photos, not to "
            "--aligned crops; drop it or drop --aligned", file=sys.stderr)
      return 2
    return _folders.run_on_folder("protect", args,
                                  lambda loaded: folders.protect_folder(loaded, args.in_dir, args.out, spec,
                                                                        force=args.force),
                                  check=lambda: attributes.parse_spec(spec),
                                  outputs="a PNG and a JSON sidecar per image")
  if args.quality is not None and args.format != "jpeg":
    print("erasablemask protect: --quality applies to --format jpeg (PNG is lossless); add --format jpeg or drop "
          "--quality", file=sys.stderr)
    return 2
  try:
    options = photos.PhotoOptions(
        largest_face=bool(args.largest_face),
        min_face_size=photos.DEFAULT_MIN_FACE_SIZE if args.min_face_size is None else args.min_face_size,
        output_format=args.format or "png", quality=95 if args.quality is None else args.quality,
        copy_unprotected=bool(args.copy_unprotected))
  except ValueError as e:
    print(f"erasablemask protect: {e}", file=sys.stderr)
    return 2
  return _folders.run_on_folder("protect", args,
                                lambda loaded: photos.protect_photos(loaded, args.in_dir, args.out, spec, options,
                                                                     force=args.force),
                                check=lambda: attributes.parse_spec(spec),
                                outputs=f"a {options.output_format.upper()} photo and a JSON sidecar per photo")
