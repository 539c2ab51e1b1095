"""Protecting whole photos: photos per second on a 12-megapixel photo with two faces, stage by stage.

The photo: two of the demo people's original photos (`../shared/assets/images/deepface_pairs`, img3 and img7) scaled
side by side onto a 4000x3000 canvas (two faces of ~900 px), encoded as a JPEG (quality 95). Each round times the
stages of `inference.photos.protect_photos` for that photo, one after the other, as the command runs them:

  decode   `image_io.read_image` of the JPEG bytes (EXIF, colour conversion)
  detect   one MTCNN pass (`photos.find_faces`: detection on the <= 1000 px copy, both faces)
  crop     both faces' aligned crops at the run's side (`photos.face_crops`, box-averaged then warped)
  model    ONE generator call for both faces (`Run.protect`, jitted, batch padded to `--batch-size`)
  paste    the change put back at full resolution (`paste.paste_changes`)
  encode   PNG of the 12-megapixel result (`photos.encode`)

A warm-up round compiles everything first; the median over `--rounds` rounds is reported (every round kept in the
JSON), and photos/s = 1 / (sum of the stages' medians). Each stage's process CPU time is recorded beside its wall
time: on a shared machine the wall time measures the load, the CPU time the work (XLA's threads add up in it).

Usage: `python -m benchmarks.photo_throughput --workdir RUN [--rounds 5] [--out benchmarks/results/photo_throughput.json]`
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import statistics
import sys
import time

import numpy as np
from PIL import Image

from benchmarks import results
from erasablemask_jax import image_io
from erasablemask_jax import inference
from erasablemask_jax.inference import attributes
from erasablemask_jax.inference import paste
from erasablemask_jax.inference import photos
from erasablemask_jax.inference.run import to_model_input

STAGES = ("decode", "detect", "crop", "model", "paste", "encode")
CANVAS = (4000, 3000)  # W x H: 12 megapixels


def two_face_photo(assets: pathlib.Path) -> bytes:
  """The 12-megapixel two-face JPEG (module docstring)."""
  canvas = Image.new("RGB", CANVAS, (90, 110, 130))
  for i, name in enumerate(("img3.jpg", "img7.jpg")):
    img = Image.open(assets / "images/deepface_pairs" / name).convert("RGB")
    r = min(CANVAS[0] / 2 / img.size[0], CANVAS[1] / img.size[1])
    img = img.resize((round(img.size[0] * r), round(img.size[1] * r)), Image.Resampling.LANCZOS)
    canvas.paste(img, (i * CANVAS[0] // 2, 0))
  buf = io.BytesIO()
  canvas.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


class _Clock:
  """Wall and process-CPU seconds of each stage (CPU time says what a stage costs when the machine is shared)."""

  def __init__(self):
    self.wall, self.cpu = {}, {}

  def __call__(self, stage, fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    self.wall[stage], self.cpu[stage] = time.perf_counter() - w, time.process_time() - c
    return out


def one_round(run, data: bytes, att_b: np.ndarray | None) -> tuple[dict[str, dict[str, float]], int, np.ndarray]:
  clock = _Clock()
  image = clock("decode", image_io.read_image, data, "photo")
  faces, _ = clock("detect", photos.find_faces, image, run.image_size, photos.run_template(run.config))
  transforms = [f.transform for f in faces]
  crops = clock("crop", photos.face_crops, image, transforms, run.image_size)
  if att_b is None:
    att_b = attributes.parse_spec("flip:Eyeglasses").apply(
        attributes.predicted(run.attribute_logits(to_model_input(crops))))
  x_adv, _ = clock("model", run.protect, to_model_input(crops), att_b)
  out = clock("paste", paste.paste_changes, image, photos.to_pixels(x_adv) - crops, np.stack(transforms))
  clock("encode", photos.encode, out)
  return {"wall_s": clock.wall, "cpu_s": clock.cpu}, len(faces), att_b


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a trained run (e.g. the demo's)")
  parser.add_argument("--assets", default=os.environ.get("ERASABLEMASK_ASSETS", "../shared/assets"))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=2, help="the run's jitted batch (faces per call)")
  parser.add_argument("--out", default="benchmarks/results/photo_throughput.json")
  args = parser.parse_args(argv)
  assets = pathlib.Path(args.assets)
  if not (assets / "images/deepface_pairs/img3.jpg").is_file():
    print(f"photo_throughput: the demo people's photos are not at {assets}/images/deepface_pairs; pass --assets",
          file=sys.stderr)
    return 2
  load_start = os.getloadavg()
  run = inference.load_run(args.workdir, batch_size=args.batch_size)
  data = two_face_photo(assets)
  _, n_faces, att_b = one_round(run, data, None)  # warm-up: compiles the detector's shapes and the generator
  if n_faces != 2:
    print(f"photo_throughput: expected 2 faces in the test photo, the detector found {n_faces}", file=sys.stderr)
    return 1
  rounds = [one_round(run, data, att_b)[0] for _ in range(args.rounds)]
  median = {s: statistics.median(r["wall_s"][s] for r in rounds) for s in STAGES}
  median_cpu = {s: statistics.median(r["cpu_s"][s] for r in rounds) for s in STAGES}
  total = sum(median.values())
  report = {
      "benchmark": "photo_throughput", "photo": {"width": CANVAS[0], "height": CANVAS[1], "faces": n_faces,
                                                 "jpeg_bytes": len(data)},
      "run": {"workdir": str(args.workdir), "image_size": run.image_size, "step": run.step},
      "median_s": median, "median_cpu_s": median_cpu, "total_s": total, "photos_per_s": 1.0 / total,
      "photos_per_s_without_codec": 1.0 / (total - median["decode"] - median["encode"]),
      "rounds": rounds}
  path = results.write_report(args.out, "photo_throughput", argv, report, load_start)
  print(" ".join(f"{s} {1000 * median[s]:.0f} ms (cpu {1000 * median_cpu[s]:.0f})" for s in STAGES)
        + f"; {1.0 / total:.3f} photos/s -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
