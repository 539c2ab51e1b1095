"""Images per second delivered by the grain pipeline at 256x256 from a prepared array_record dataset.

Prepares a face_folder dataset from the bundled sample (28 faces, replicated by listing the folder through symlinks
is unnecessary: the sampler repeats epochs), then times `make_train_iterator` batches (decode PNG, flip, batch,
att_b). Prints a table and writes JSON. Usage: `python -m benchmarks.data_throughput [--batches 40] [--out FILE]`
(default `benchmarks/results/data_throughput.json`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import grain
import jax
import numpy as np

from benchmarks import results as results_lib
from erasablemask_jax.data import builders
from erasablemask_jax.data import pipeline


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--out", default=results_lib.out_path("data_throughput.json"))
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    d = builders.build("face_folder", "bundled:sample_faces", tmp, image_size=args.size)
    rows = []
    for threads_prefetch in (16, 64):
      it = pipeline.make_train_iterator(d, batch_size=args.batch_size, seed=0, image_size=args.size,
                                        prefetch=threads_prefetch)
      next(it)
      t = time.perf_counter()
      for _ in range(args.batches):
        b = next(it)
      dt = time.perf_counter() - t
      rows.append({"prefetch": threads_prefetch, "images_per_s": args.batches * args.batch_size / dt,
                   "batch_ms": 1000 * dt / args.batches})
  print(f"{'prefetch':>8} {'images/s':>10} {'ms/batch':>9}   (batch {args.batch_size}, {args.size}x{args.size})")
  for r in rows:
    print(f"{r['prefetch']:>8} {r['images_per_s']:>10.1f} {r['batch_ms']:>9.1f}")
  body = {"versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "grain": getattr(grain, "__version__", "?"), "numpy": np.__version__},
          "settings": vars(args), "results": rows}
  print(f"wrote {results_lib.write_report(args.out, 'data_throughput', argv, body, load_start)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
