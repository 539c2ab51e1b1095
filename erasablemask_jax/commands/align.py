"""`erasablemask align IN_DIR OUT_DIR --size 256`: MTCNN-align every photo in a folder."""

from __future__ import annotations

import logging


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "align", help="detect and align faces: loose crops at --size for generation, ArcFace 112 crops, a JSON record")
  p.add_argument("in_dir", help="folder of photos (searched recursively)")
  p.add_argument("out_dir", help="writes loose_<size>/, arcface_112/ and alignment_meta.json here")
  p.add_argument("--size", type=int, default=256, help="side of the loose generation crop (default 256)")
  p.add_argument("--arcface-size", type=int, default=112, help="side of the ArcFace-template crop (default 112)")
  p.add_argument("--templates", default="loose,arcface", help="comma-separated: loose, arcface")
  p.add_argument("--min-face", type=float, default=40.0, help="smallest face side in pixels (default 40)")
  p.set_defaults(func=run)


def run(args) -> int:
  from erasablemask_jax.align import detect  # pylint: disable=g-import-not-at-top
  from erasablemask_jax.align import pipeline  # pylint: disable=g-import-not-at-top
  from erasablemask_jax.align import warp  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  templates = tuple(t.strip() for t in args.templates.split(",") if t.strip())
  bad = [t for t in templates if t not in warp.TEMPLATES]
  if bad or args.size < 16 or args.arcface_size < 16:
    print(f"error: templates must be among {warp.TEMPLATES} (got {bad}) and sizes >= 16")
    return 2
  try:
    report = pipeline.align_folder(args.in_dir, args.out_dir, args.size, templates,
                                   detect.DetectorConfig(min_face=args.min_face), args.arcface_size)
  except FileNotFoundError as e:
    print(f"error: {e}")
    return 1
  print(report.summary())
  return 0 if report.written else 1
