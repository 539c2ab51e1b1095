"""`erasablemask align IN_DIR OUT_DIR --size 256 [--force]`: MTCNN-align every photo in a folder.

Existing outputs are never overwritten without --force (the command refuses before writing anything). Errors are one
line on stderr: exit status 2 for bad arguments, 1 for a missing folder, existing outputs or an unwritable OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys

from erasablemask_jax.commands import _args
from erasablemask_jax.commands import _outputs

MIN_SIDE = 16


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "align", help="detect and align faces: loose crops at --size for generation, ArcFace 112 crops, a JSON record",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("in_dir", help="folder of photos (searched recursively)")
  p.add_argument("out_dir", help="writes loose_<size>/, arcface_112/ and alignment_meta.json here")
  p.add_argument("--size", type=_args.positive_int, default=256, help="side of the loose generation crop (default 256)")
  p.add_argument("--arcface-size", type=_args.positive_int, default=112,
                 help="side of the ArcFace-template crop (default 112)")
  p.add_argument("--templates", default="loose,arcface", help="comma-separated: loose, arcface")
  p.add_argument("--min-face", type=_args.positive_float, default=40.0,
                 help="smallest face side in pixels (default 40)")
  p.add_argument("--force", action="store_true", help="overwrite existing outputs")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.align import detect  # pylint: disable=g-import-not-at-top
  from erasablemask_jax.align import pipeline  # pylint: disable=g-import-not-at-top
  from erasablemask_jax.align import warp  # pylint: disable=g-import-not-at-top

  templates = tuple(t.strip() for t in args.templates.split(",") if t.strip())
  bad = [t for t in templates if t not in warp.TEMPLATES]
  if bad or not templates:
    print(f"erasablemask align: --templates {args.templates!r}: choose among {', '.join(warp.TEMPLATES)}",
          file=sys.stderr)
    return 2
  if min(args.size, args.arcface_size) < MIN_SIDE:
    print(f"erasablemask align: --size and --arcface-size must be at least {MIN_SIDE} (got {args.size} and "
          f"{args.arcface_size})", file=sys.stderr)
    return 2
  try:
    _outputs.check_writable(args.out_dir, "OUT_DIR")
    report = pipeline.align_folder(args.in_dir, args.out_dir, args.size, templates,
                                   detect.DetectorConfig(min_face=args.min_face), args.arcface_size, force=args.force)
  except (FileNotFoundError, FileExistsError, _outputs.OutputLocationError) as e:
    print(f"erasablemask align: {e}", file=sys.stderr)
    return 1
  print(report.summary())
  print(_outputs.outputs_line("align", args.out_dir, ", ".join(f"{t}_{args.arcface_size if t == 'arcface' else args.size}/"
                                                                for t in templates)
                              + ", alignment_meta.json, align_report.json"))
  return 0 if report.written else 1
