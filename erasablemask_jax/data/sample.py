"""Rebuilds the bundled sample `assets/sample_faces/` from the MIT-licensed photos in the shared assets.

`python -m erasablemask_jax.data.sample ASSETS_DIR` aligns (our MTCNN, `loose` template, 256x256 PNG):
- deepface `tests/unit/dataset/img1..img25.jpg` (MIT, (c) 2019 Sefik Ilkin Serengil), identities from the assets'
  `identity_clusters.csv` (9 people);
- facenet-pytorch `data/test_images/<name>/1.jpg` (MIT, (c) 2019 Timothy Esler), the 3 people whose raw photo is in
  the assets (identities 9..11). bradley_cooper and shea_whigham exist only as tight 160x160 crops, which cannot give
  a loose 256 crop without large invented borders, so they are left out.
The 13 attribute labels in `attributes.csv` were written by the project by looking at each face; this script keeps
the existing labels and only re-creates the images and the identity column.
"""

from __future__ import annotations

import csv
import pathlib
import sys

import numpy as np
from PIL import Image

from erasablemask_jax.align import pipeline as align_pipeline
from erasablemask_jax.data import builders
from erasablemask_jax import image_io
from erasablemask_jax.data import labels as labels_lib

SAMPLE_DIR = builders.PACKAGE_ASSETS / "sample_faces"
FACENET_PEOPLE = ("angelina_jolie", "kate_siegel", "paul_rudd")


def sources(assets: pathlib.Path) -> list[tuple[str, pathlib.Path, int]]:
  """(output name, source photo, identity) for every sample face."""
  out = []
  with (assets / "images/deepface_pairs/identity_clusters.csv").open() as f:
    for row in csv.DictReader(f):
      out.append((f"deepface_{pathlib.Path(row['file']).stem}.png", assets / "images/deepface_pairs" / row["file"],
                  int(row["cluster_id"])))
  for k, person in enumerate(FACENET_PEOPLE):
    out.append((f"facenet_{person}.png", assets / f"images/facenet_pytorch_raw/{person}.jpg", 9 + k))
  return out


def main(argv: list[str]) -> int:
  assets = pathlib.Path(argv[0]) if argv else pathlib.Path("../shared/assets")
  SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
  old = {}
  if (SAMPLE_DIR / "attributes.csv").is_file():
    old = labels_lib.read_attribute_csv(SAMPLE_DIR / "attributes.csv")
  rows = {}
  for name, src, identity in sources(assets):
    image = image_io.read_image(src, str(src))
    result = align_pipeline.align_image(image, 256, "loose")
    if result is None:
      print(f"no face in {src}; not bundled")
      continue
    Image.fromarray(result.crop).save(SAMPLE_DIR / name, optimize=True)
    rows[name] = (old.get(name, (np.zeros(labels_lib.NUM_ATTRIBUTES, np.float32), -1))[0], identity)
  labels_lib.write_attribute_csv(SAMPLE_DIR / "attributes.csv", rows)
  print(f"wrote {len(rows)} faces to {SAMPLE_DIR}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
