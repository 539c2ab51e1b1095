"""CelebA-HQ built aligned (MTCNN, loose template) as the paper config expects, and that config pointing at it."""

from __future__ import annotations

import shutil

import numpy as np

from erasablemask_jax import config as config_lib
from erasablemask_jax.align import pipeline as align_pipeline
from erasablemask_jax.data import builders
from erasablemask_jax import image_io
from erasablemask_jax.data import labels
from erasablemask_jax.data import pipeline

SAMPLE = builders.resolve_manual_dir("bundled:sample_faces")
PHOTOS = ("deepface_img1.png", "deepface_img13.png", "deepface_img16.png", "facenet_paul_rudd.png")


def test_celeba_hq_aligned_build_holds_mtcnn_loose_crops(tmp_path):
  manual = tmp_path / "manual"
  (manual / "CelebA-HQ-img").mkdir(parents=True)
  lines = [str(len(PHOTOS)), " ".join(labels.ATTRIBUTES)]
  for i, name in enumerate(PHOTOS):
    shutil.copy(SAMPLE / name, manual / f"CelebA-HQ-img/{i}.png")
    lines.append(f"{i}.jpg " + " ".join("1" if (i + k) % 2 else "-1" for k in range(labels.NUM_ATTRIBUTES)))
  (manual / builders.CELEBA_HQ_ANNOTATIONS).write_text("\n".join(lines) + "\n")

  d = builders.build("celeba_hq", manual, tmp_path / "data", image_size=64, split_sizes=(2, 1, 1), align=True)
  assert d.parent.name == "s64_aligned_split2-1-1"
  records = [pipeline.open_source(d, split)[0] for split in ("train", "validation", "test")]
  for i, record in zip((0, 2, 3), records):
    photo = image_io.read_image(manual / f"CelebA-HQ-img/{i}.png")
    want = align_pipeline.align_image(photo, 64, "loose").crop
    np.testing.assert_array_equal(record["image"], want)
    assert not np.array_equal(record["image"], image_io.square_resize(photo, 64))  # not the plain resize


def test_paper_config_reads_the_aligned_build_through_the_arcface_box():
  config = config_lib.load_config("celebahq_paper")
  assert config.data.data_dir.endswith(f"celeba_hq/{builders.make_config(256, align=True).name}/1.0.0")
  assert config.fr.input_crop == "loose_to_arcface"
  assert config.fr.threshold_source == "peer_default"
