"""Builders prepared from tiny manual directories made here; read back through tfds.data_source + grain."""

from __future__ import annotations

import io
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from erasablemask_jax.data import builders
from erasablemask_jax import image_io
from erasablemask_jax.data import labels
from erasablemask_jax.data import pipeline

S = 16


def _face(i: int, size: int = S) -> np.ndarray:
  """A distinct, smooth image per index (PNG round trip is lossless, so read-back must be exact)."""
  y, x = np.mgrid[0:size, 0:size]
  return np.stack([(x * 7 + i * 13) % 256, (y * 11 + i * 29) % 256, np.full_like(x, i % 256)], -1).astype(np.uint8)


def _att(i: int) -> np.ndarray:
  return ((np.arange(labels.NUM_ATTRIBUTES) + i) % 3 == 0).astype(np.float32)


def _make_celeba_hq(root: pathlib.Path, n: int) -> pathlib.Path:
  (root / "CelebA-HQ-img").mkdir(parents=True)
  names = ["5_o_Clock_Shadow", *labels.ATTRIBUTES[::-1], "Smiling"]  # other order + extra columns
  lines = [str(n), " ".join(names)]
  for i in range(n):
    Image.fromarray(_face(i)).save(root / f"CelebA-HQ-img/{i}.png")
    a = dict(zip(labels.ATTRIBUTES, _att(i)))
    lines.append(f"{i}.jpg " + " ".join("1" if a.get(c, 0) else "-1" for c in names))
  (root / builders.CELEBA_HQ_ANNOTATIONS).write_text("\n".join(lines) + "\n")
  return root


def _by_file(source):
  return {(r["file"].decode() if isinstance(r["file"], bytes) else r["file"]): r for r in
          (source[i] for i in range(len(source)))}


def test_celeba_hq_split_and_exact_read_back(tmp_path):
  manual = _make_celeba_hq(tmp_path / "manual", 10)
  d = builders.build("celeba_hq", manual, tmp_path / "data", image_size=S, split_sizes=(6, 1, 3))
  want = {"train": range(0, 6), "validation": range(6, 7), "test": range(7, 10)}  # AttGAN: by index, in order
  for split, idx in want.items():
    src = pipeline.open_source(d, split)
    assert len(src) == len(idx)
    for k, i in enumerate(idx):
      r = src[k]
      assert r["file"].decode() == f"CelebA-HQ-img/{i}.png"
      np.testing.assert_array_equal(r["image"], _face(i))
      np.testing.assert_array_equal(r["att"], _att(i))
      assert r["identity"] == -1


def test_celeba_hq_missing_annotation_names_the_file(tmp_path):
  manual = _make_celeba_hq(tmp_path / "manual", 3)
  (manual / builders.CELEBA_HQ_ANNOTATIONS).unlink()
  with pytest.raises(labels.LabelFileError, match="CelebAMask-HQ-attribute-anno.txt"):
    builders.build("celeba_hq", manual, tmp_path / "data", image_size=S, split_sizes=(1, 1, 1))


def test_celeba_hq_split_sizes_must_match(tmp_path):
  manual = _make_celeba_hq(tmp_path / "manual", 4)
  with pytest.raises(ValueError, match="split sizes"):
    builders.build("celeba_hq", manual, tmp_path / "data", image_size=S)  # default 28000/500/1500


def test_ffhq_requires_its_csv_and_reads_back(tmp_path):
  manual = tmp_path / "ffhq"
  (manual / "images" / "00000").mkdir(parents=True)
  rows = {}
  for i in range(5):
    name = f"images/00000/{i:05d}.png"
    Image.fromarray(_face(i)).save(manual / name)
    rows[name] = (_att(i), 100 + i)
  with pytest.raises(labels.LabelFileError, match="attributes.csv"):
    builders.build("ffhq", manual, tmp_path / "data", image_size=S)
  labels.write_attribute_csv(manual / "attributes.csv", rows)
  d = builders.build("ffhq", manual, tmp_path / "data", image_size=S, split_sizes=(3,))
  train, test = _by_file(pipeline.open_source(d, "train")), _by_file(pipeline.open_source(d, "test"))
  assert sorted(train) == sorted(rows)[:3] and sorted(test) == sorted(rows)[3:]
  for name, r in {**train, **test}.items():
    i = int(pathlib.Path(name).stem)
    np.testing.assert_array_equal(r["image"], _face(i))
    np.testing.assert_array_equal(r["att"], _att(i))
    assert r["identity"] == 100 + i


def _bad_files(folder: pathlib.Path) -> dict[str, str]:
  """Writes one file per kind of odd input; returns {file: expected outcome}."""
  folder.mkdir(parents=True, exist_ok=True)
  big = 40
  img = _face(3, big)
  Image.fromarray(img).save(folder / "ok.png")
  Image.fromarray(img).convert("L").save(folder / "gray.png")
  Image.fromarray(img).convert("RGBA").save(folder / "rgba.png")
  Image.fromarray(img).convert("CMYK").save(folder / "cmyk.jpg")
  Image.fromarray((img[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(img[:, :30]).save(folder / "rotated.jpg", exif=exif)
  Image.fromarray(_face(1, 8)).save(folder / "tiny.png")
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG")
  (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  return {"ok.png": "kept", "gray.png": "kept", "rgba.png": "kept", "cmyk.jpg": "kept", "sixteen.png": "kept",
          "rotated.jpg": "kept", "tiny.png": "too small", "truncated.jpg": "unreadable", "corrupt.png": "unreadable"}


def test_bad_inputs_converted_or_skipped_with_reasons(tmp_path, caplog):
  folder = tmp_path / "photos"
  expected = _bad_files(folder)
  report = image_io.ImportReport()
  for name, outcome in expected.items():
    report.read += 1
    try:
      arr = image_io.read_image(folder / name, name, report)
    except image_io.SkipImage as e:
      assert str(e).startswith(outcome), (name, str(e))
      report.skip(name, str(e))
      continue
    assert outcome == "kept", name
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if name == "rotated.jpg":  # orientation 6: the 40x30 (HxW) pixels become 30x40
      assert arr.shape[:2] == (30, 40)
    if name == "sixteen.png":  # 16-bit values v * 257 come back as v
      np.testing.assert_array_equal(arr[..., 0], _face(3, 40)[..., 0])
    if name == "rgba.png":
      np.testing.assert_array_equal(arr, _face(3, 40))  # opaque alpha: composite is the image itself
    report.written += 1
  assert report.skipped == {"too small": 1, "unreadable": 2}
  assert set(report.converted) >= {"L converted to RGB", "RGBA with alpha composited on white",
                                   "CMYK converted to RGB", "EXIF orientation 6 applied"}
  assert any("16" in k for k in report.converted)
  assert "6 written of 9 read" in report.summary()

  caplog.set_level(logging.INFO)
  d = builders.build("face_folder", folder, tmp_path / "data", image_size=S)
  assert len(pipeline.open_source(d, "train")) == 6
  assert "skipped" in caplog.text and "truncated.jpg" in caplog.text
  saved = list(pathlib.Path(d).glob("prepare_report.json"))
  assert saved and '"unreadable": 2' in saved[0].read_text()


def test_face_folder_csv_identity_and_split(tmp_path):
  folder = tmp_path / "faces"
  folder.mkdir()
  for i in range(4):
    Image.fromarray(_face(i, 24)).save(folder / f"p{i}.png")
  (folder / "attributes.csv").write_text(
      "file,identity,split\np0.png,7,train\np1.png,7,test\np2.png,,train\np3.png,9,train\n")
  d = builders.build("face_folder", folder, tmp_path / "data", image_size=S)
  train, test = _by_file(pipeline.open_source(d, "train")), _by_file(pipeline.open_source(d, "test"))
  assert sorted(train) == ["p0.png", "p2.png", "p3.png"] and sorted(test) == ["p1.png"]
  assert [int(train[k]["identity"]) for k in sorted(train)] == [7, -1, 9]
  arrays = pipeline.load_face_folder_arrays(folder, S)
  assert arrays["file"] == ["p0.png", "p1.png", "p2.png", "p3.png"]
  assert arrays["identity"].tolist() == [7, 7, -1, 9] and arrays["image"].shape == (4, S, S, 3)
