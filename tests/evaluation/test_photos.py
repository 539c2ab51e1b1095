"""`erasablemask protect` / `erase` / `evaluate --photos` on whole photos: the demo's held-out people's originals
from the shared assets, at their own size, and every odd photo the issue names (16-bit, CMYK, palette, EXIF-rotated,
no face, a face too small, two faces)."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from erasablemask_jax import cli
from erasablemask_jax import image_io
from erasablemask_jax.evaluation import photos as photos_eval
from erasablemask_jax.inference import paste
from erasablemask_jax.inference import photos
from erasablemask_jax.inference import sidecar

pytestmark = pytest.mark.assets

PHOTO = "img25.jpg"  # 400x400, one face of ~214 px: the smallest photo of the demo's people


def _protect(tiny_run, inp, out, *extra):
  return cli.main(["protect", "--workdir", str(tiny_run), "--in", str(inp), "--out", str(out), *extra])


def _variants(assets_dir, dest):
  """The photo as a JPEG, EXIF-rotated, 16-bit grey, CMYK and palette files, and a photo with no face."""
  dest.mkdir(parents=True)
  src = assets_dir / "images/deepface_pairs" / PHOTO
  shutil.copy(src, dest / "plain.jpg")
  img = Image.open(src).convert("RGB")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored turned 90 degrees clockwise; viewers (and we) turn it back
  img.transpose(Image.Transpose.ROTATE_90).save(dest / "rotated.jpg", exif=exif, quality=95)
  grey16 = (np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16)
  Image.fromarray(grey16).save(dest / "grey16.png")
  img.convert("CMYK").save(dest / "cmyk.jpg", quality=95)
  img.convert("P", palette=Image.Palette.ADAPTIVE).save(dest / "palette.png")
  Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(dest / "empty.png")
  (dest / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  return dest


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory, tiny_run, assets_dir):
  root = tmp_path_factory.mktemp("photos")
  inp = _variants(assets_dir, root / "in")
  rc = _protect(tiny_run, inp, root / "out")
  erc = cli.main(["erase", "--workdir", str(tiny_run), "--in", str(root / "out"), "--out", str(root / "restored")])
  return {"rc": rc, "erase_rc": erc, "in": inp, "out": root / "out", "restored": root / "restored"}


def test_photos_come_back_at_their_size_with_only_the_faces_changed(photo_run, loaded_run):
  assert photo_run["rc"] == 0 and photo_run["erase_rc"] == 0
  names = ["plain", "rotated", "grey16", "cmyk", "palette"]
  assert sorted(p.name for p in photo_run["out"].iterdir()) == sorted([f"{n}.png" for n in names]
                                                                       + [f"{n}.json" for n in names])
  upright = image_io.read_image(photo_run["in"] / "plain.jpg")
  for name in names:
    source = next(photo_run["in"].glob(f"{name}.*"))
    original = image_io.read_image(source)
    assert original.shape == upright.shape  # the EXIF-rotated photo is read upright
    side = sidecar.read_photo_sidecar(photo_run["out"] / f"{name}.json")
    assert side["source"] == source.name and side["source_size"] == list(original.shape[:2])
    assert len(side["faces"]) == 1 and side["checkpoint"]["params_sha256"] == loaded_run.fingerprint
    face = side["faces"][0]
    assert face["size"] > 150 and len(face["landmarks"]) == 5 and face["transform"].shape == (2, 3)
    assert face["att_b"][6] == 1 - face["att_a"][6]  # the default flip:Eyeglasses
    region = paste.face_region_mask(face["transform"][None], loaded_run.image_size, original.shape[:2])
    assert 0.05 < region.mean() < 0.9
    for folder in ("out", "restored"):
      out = image_io.read_image(photo_run[folder] / f"{name}.png")
      assert out.shape == original.shape
      np.testing.assert_array_equal(out[~region], original[~region])  # outside the face: the photo's own pixels
      assert (out[region] != original[region]).any()


def test_photo_summary_names_the_face_less_and_the_unreadable(tiny_run, assets_dir, tmp_path, capsys):
  inp = _variants(assets_dir, tmp_path / "in")
  for name in ("rotated.jpg", "grey16.png", "cmyk.jpg", "palette.png"):
    (inp / name).unlink()
  assert _protect(tiny_run, inp, tmp_path / "out") == 0
  out = capsys.readouterr().out
  assert "empty.png: no face found; not written (pass --copy-unprotected" in out
  assert "broken.jpg: unreadable" in out
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plain.json", "plain.png"]
  assert _protect(tiny_run, inp, tmp_path / "copied", "--copy-unprotected") == 0
  assert (tmp_path / "copied" / "empty.png").read_bytes() == (inp / "empty.png").read_bytes()
  assert "empty.png: no face found; copied unchanged" in capsys.readouterr().out


def test_a_face_below_min_face_size_is_skipped_with_its_size(tiny_run, assets_dir, tmp_path, capsys):
  (tmp_path / "in").mkdir()
  shutil.copy(assets_dir / "images/deepface_pairs" / PHOTO, tmp_path / "in")
  assert _protect(tiny_run, tmp_path / "in", tmp_path / "out", "--min-face-size", "1000") == 1
  line = [l for l in capsys.readouterr().out.splitlines() if PHOTO in l][0]
  assert "no face found of at least 1000 px (face of 214 px is below --min-face-size 1000)" in line


def test_two_faces_one_detector_pass_one_generator_call(tiny_run, loaded_run, assets_dir, tmp_path, monkeypatch):
  a = Image.open(assets_dir / "images/deepface_pairs" / PHOTO).convert("RGB")
  pair = Image.new("RGB", (800, 400))
  pair.paste(a, (0, 0))
  pair.paste(a.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (400, 0))
  (tmp_path / "in").mkdir()
  pair.save(tmp_path / "in" / "pair.png")
  calls = {"protect": 0, "detect": 0}
  real_protect, real_detect = type(loaded_run).protect, photos.detect.detect_faces

  def counting_protect(self, x, att_b):
    calls["protect"] += 1
    assert len(x) == 2
    return real_protect(self, x, att_b)

  def counting_detect(*args, **kwargs):
    calls["detect"] += 1
    return real_detect(*args, **kwargs)

  monkeypatch.setattr(type(loaded_run), "protect", counting_protect)
  monkeypatch.setattr(photos.detect, "detect_faces", counting_detect)
  result = photos.protect_photos(loaded_run, tmp_path / "in", tmp_path / "out", attrs="roll", progress=False)
  assert result.written == ["pair.png"] and calls == {"protect": 1, "detect": 1}
  side = sidecar.read_photo_sidecar(tmp_path / "out" / "pair.json")
  assert len(side["faces"]) == 2
  np.testing.assert_array_equal(side["faces"][0]["att_b"], side["faces"][1]["att_a"])  # roll within the folder
  monkeypatch.undo()
  result = photos.protect_photos(loaded_run, tmp_path / "in", tmp_path / "largest", "flip:Male",
                                 photos.PhotoOptions(largest_face=True), progress=False)
  assert len(sidecar.read_photo_sidecar(tmp_path / "largest" / "pair.json")["faces"]) == 1


def test_jpeg_output_and_bad_photo_flags(tiny_run, assets_dir, tmp_path, capsys):
  (tmp_path / "in").mkdir()
  shutil.copy(assets_dir / "images/deepface_pairs" / PHOTO, tmp_path / "in")
  assert _protect(tiny_run, tmp_path / "in", tmp_path / "out", "--format", "jpeg", "--quality", "90") == 0
  assert image_io.read_image(tmp_path / "out" / "img25.jpg").shape == (400, 400, 3)
  assert json.loads((tmp_path / "out" / "img25.json").read_text())["jpeg_quality"] == 90
  capsys.readouterr()
  for extra, words in ((["--quality", "90"], "--quality applies to --format jpeg"),
                       (["--format", "jpeg", "--quality", "99"], "choose a JPEG quality from 1 to 95"),
                       (["--aligned", "--largest-face"], "--largest-face applies to photos")):
    assert _protect(tiny_run, tmp_path / "in", tmp_path / "o2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
  assert not (tmp_path / "o2").exists()


def test_erase_follows_a_resized_copy_and_refuses_a_cropped_one(photo_run, tiny_run, tmp_path, capsys):
  shared = tmp_path / "shared"
  shared.mkdir()
  protected = image_io.read_image(photo_run["out"] / "plain.png")
  Image.fromarray(protected).resize((300, 300), Image.Resampling.LANCZOS).save(shared / "plain.png")
  Image.fromarray(protected[:350]).save(shared / "cropped.png")
  Image.fromarray(protected).save(shared / "nosidecar.png")
  shutil.copy(photo_run["out"] / "plain.json", shared / "plain.json")
  shutil.copy(photo_run["out"] / "plain.json", shared / "cropped.json")
  side = json.loads((photo_run["out"] / "plain.json").read_text())
  side["faces"][0]["transform"] = [[0, 0, 0], [0, 0, 0]]
  (shared / "broken.json").write_text(json.dumps(side))
  Image.fromarray(protected).save(shared / "broken.png")
  assert cli.main(["erase", "--workdir", str(tiny_run), "--in", str(shared), "--out", str(tmp_path / "r")]) == 0
  out = capsys.readouterr().out
  assert image_io.read_image(tmp_path / "r" / "plain.png").shape == (300, 300, 3)
  assert "cropped.png: 400x350 is not the protected photo's 400x400 or a resized copy" in out
  assert "nosidecar.png: no sidecar" in out
  assert "broken.png: sidecar" in out and "not an invertible similarity" in out


def test_evaluate_photos_scores_the_end_to_end_path(tiny_run, assets_dir, tmp_path, capsys):
  inp = tmp_path / "in"
  inp.mkdir()
  shutil.copy(assets_dir / "images/deepface_pairs" / PHOTO, inp / "a.jpg")
  Image.open(inp / "a.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(inp / "b.png")
  rc = cli.main(["evaluate", "--workdir", str(tiny_run), "--photos", str(inp), "--fr", "bundled:mobilefacenet",
                 "--out", str(tmp_path / "report")])
  assert rc == 0
  report = json.loads((tmp_path / "report" / "photos_report.json").read_text())
  assert report["photos"] == 2 and report["faces"] == 2 and report["all_same_size"]
  assert report["changed_outside_faces"]["max"] == {"adv": 0.0, "rec": 0.0}  # PNG: not one pixel outside
  assert set(report["lost"]) == {"clean", "adv", "rec", "shared.clean", "shared.adv", "shared.rec"}
  assert report["lost"]["clean"] == 0
  assert all(len(report["lost_faces"][k]) == n for k, n in report["lost"].items())  # one face per photo: named
  (m,) = report["models"].values()
  for where in ("photos", "shared"):
    for rate in ("asr", "esr", "smr", "irr"):
      assert 0.0 <= m[where][rate] <= 1.0
  assert report["face_psnr"]["adv"] > 5 and isinstance(report["face_lpips"]["adv"], float)
  assert (tmp_path / "report" / "photos.png").is_file()
  assert len(list((tmp_path / "report" / "shared" / "restored").glob("*.png"))) == 2
  assert "Photos: 2 photos, 2 faces" in capsys.readouterr().out


def test_the_demo_photos_skip_with_one_line_without_the_assets(tmp_path):
  report, line = photos_eval.demo_photos(tmp_path, ["deepface_img12.png"], "bundled:sample_faces",
                                         assets=tmp_path / "nowhere")
  assert report is None and "skipped" in line and "ERASABLEMASK_ASSETS" in line
  report, line = photos_eval.demo_photos(tmp_path, ["x.png"], "/some/folder")
  assert report is None and "not the bundled sample faces" in line


def test_the_demo_finds_the_held_out_originals(assets_dir):
  got = photos_eval.original_photos(["deepface_img12.png", "deepface_img16.png", "facenet_paul_rudd.png", "nope.png"],
                                    assets_dir)
  assert sorted(got) == ["deepface_img12.png", "deepface_img16.png", "facenet_paul_rudd.png"]
  assert got["deepface_img12.png"].name == "img12.jpg"


def test_existing_photo_outputs_are_refused_before_any_work(photo_run, tiny_run, capsys):
  before = {p: p.read_bytes() for p in photo_run["out"].iterdir()}
  assert _protect(tiny_run, photo_run["in"], photo_run["out"]) == 1
  err = capsys.readouterr().err.strip()
  assert "output file(s) exist" in err and "--force" in err and len(err.splitlines()) == 1
  assert {p: p.read_bytes() for p in photo_run["out"].iterdir()} == before
  rc = cli.main(["erase", "--workdir", str(tiny_run), "--in", str(photo_run["out"]), "--out",
                 str(photo_run["restored"]), "--source-attrs", "bits:0000000000000"])
  assert rc == 2 and "a photo's faces need its sidecar" in capsys.readouterr().err
