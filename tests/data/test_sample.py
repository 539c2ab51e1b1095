"""The bundled sample: present, labelled, loadable by the builder and the in-memory loader."""

from __future__ import annotations

import numpy as np

from erasablemask_jax.data import builders
from erasablemask_jax.data import pipeline


def test_bundled_sample_loads_with_labels():
  arrays = pipeline.load_face_folder_arrays("bundled:sample_faces", 64)
  assert arrays["image"].shape == (28, 64, 64, 3)
  assert len(set(arrays["identity"].tolist())) == 12 and (arrays["identity"] >= 0).all()
  assert arrays["att"].sum(0).min() >= 0 and 0 < arrays["att"][:, 7].sum() < 28  # both sexes present
  assert arrays["report"].skipped == {}


def test_bundled_sample_builds(tmp_path):
  d = builders.build("face_folder", "bundled:sample_faces", tmp_path, image_size=32)
  it = pipeline.make_train_iterator(d, batch_size=8, seed=0, image_size=32)
  assert next(it)["image"].shape == (8, 32, 32, 3)
