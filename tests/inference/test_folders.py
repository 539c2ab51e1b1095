"""`erasablemask protect` / `erase` end to end on bundled sample faces, checked against direct network calls."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from evaluation_helpers import copy_faces
from erasablemask_jax import cli
from erasablemask_jax import inference
from erasablemask_jax.data import labels
from erasablemask_jax.image_io import to_uint8
from erasablemask_jax.inference import attributes
from erasablemask_jax.inference import sidecar

FACES = ["deepface_img12.png", "deepface_img13.png", "deepface_img16.png", "facenet_paul_rudd.png"]


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def _square(path, size):
  from erasablemask_jax import image_io
  return image_io.square_resize(image_io.read_image(path), size)


@pytest.fixture(scope="module")
def protected(tmp_path_factory, tiny_run):
  root = tmp_path_factory.mktemp("protect")
  inp = copy_faces(root / "in", FACES)
  (inp / "sub").mkdir()
  (inp / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (inp / "tiny.png").write_bytes(_tiny_png())
  out = root / "out"
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(inp), "--out", str(out), "--attrs",
                 "flip:Eyeglasses,Male", "--batch-size", "3"])
  return {"rc": rc, "in": inp, "out": out, "root": root}


def _tiny_png() -> bytes:
  import io
  buf = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def test_protect_writes_pngs_and_sidecars_equal_to_the_networks(protected, loaded_run):
  assert protected["rc"] == 0
  out, inp = protected["out"], protected["in"]
  written = sorted(p.name for p in out.rglob("*") if p.is_file())
  assert written == sorted([f.replace(".png", ".json") for f in FACES] + FACES)  # corrupt and tiny files skipped
  rows = labels.read_attribute_csv(inp / "attributes.csv")
  size = loaded_run.image_size
  x = inference.to_model_input(np.stack([_square(inp / f, size) for f in FACES]))
  att_a = np.stack([rows[f][0] for f in FACES])
  att_b = att_a.copy()
  for name in ("Eyeglasses", "Male"):
    att_b[:, labels.ATTRIBUTES.index(name)] = 1 - att_b[:, labels.ATTRIBUTES.index(name)]
  state, models = loaded_run.state, loaded_run.models
  (x_adv, _), _ = models.protect(state.g.variables, state.e_adv.variables, jax.numpy.asarray(x), att_b)
  expected = to_uint8(np.asarray(x_adv))
  for i, f in enumerate(FACES):
    got = _png(out / f)
    assert got.shape == (size, size, 3)
    assert np.abs(got.astype(int) - expected[i]).max() <= 1  # jitted batch vs eager: last-bit rounding at most
    side = sidecar.read_sidecar(out / f.replace(".png", ".json"))
    np.testing.assert_array_equal(side["att_a"], att_a[i])
    np.testing.assert_array_equal(side["att_b"], att_b[i])
    assert side["att_a_source"] == "attributes.csv"
    assert sorted(side["flipped"]) == ["Eyeglasses", "Male"]
    assert side["checkpoint"]["params_sha256"] == inference.params_fingerprint(state)
    assert side["checkpoint"]["step"] == loaded_run.step == 2
    assert side["target"] == "identity:0" and side["surrogates"] == ["bundled:mobilefacenet"]
  assert not [p for p in protected["root"].rglob(".*")], "temporary files left behind"


def test_protect_reports_skipped_files_with_reasons(tmp_path, tiny_run, capsys):
  inp = copy_faces(tmp_path / "in", FACES[:1])
  (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(inp), "--out", str(tmp_path / "out")])
  text = capsys.readouterr().out
  assert rc == 0
  assert "1 written, 1 skipped" in text and "broken.png: unreadable" in text


def test_protect_refuses_to_overwrite_without_force(protected, tiny_run, capsys):
  out = protected["out"]
  before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(protected["in"]), "--out", str(out)])
  assert rc == 1 and "pass --force" in capsys.readouterr().err
  assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(protected["in"]), "--out", str(out), "--force",
                 "--attrs", "flip:Eyeglasses,Male"])
  assert rc == 0 and any(p.stat().st_mtime_ns != before[p] for p in out.iterdir())


def test_protect_without_labels_uses_d_att(tmp_path, loaded_run):
  from erasablemask_jax.inference import folders
  inp = copy_faces(tmp_path / "in", FACES[:2], with_csv=False)
  result = folders.protect_folder(loaded_run, inp, tmp_path / "out", attrs="bits:0000000000001", progress=False)
  assert len(result.written) == 2
  x = inference.to_model_input(np.stack([_square(inp / f, loaded_run.image_size) for f in FACES[:2]]))
  _, logits = loaded_run.models.discriminate(loaded_run.state.d.variables, jax.numpy.asarray(x))
  for i, f in enumerate(FACES[:2]):
    side = sidecar.read_sidecar(tmp_path / "out" / f.replace(".png", ".json"))
    assert side["att_a_source"] == "d_att"
    np.testing.assert_array_equal(side["att_a"], (np.asarray(logits[i]) > 0).astype(np.float32))
    np.testing.assert_array_equal(side["att_b"], np.eye(13, dtype=np.float32)[12])


@pytest.mark.parametrize("spec", ["flip:Nose", "bits:0101", "set:Male=2", "shuffle"])
def test_bad_attribute_specs_are_refused(spec, tmp_path, tiny_run, capsys):
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                 "--attrs", spec])
  assert rc == 1 and "attribute spec" in capsys.readouterr().err


def test_bad_workdir_is_a_clear_error(tmp_path, capsys):
  rc = cli.main(["protect", "--aligned", "--workdir", str(tmp_path), "--in", str(tmp_path / "in"), "--out", str(tmp_path / "o")])
  assert rc == 1 and "not a training run" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["protect", "erase"])
@pytest.mark.parametrize("out", [".", "./", "sub", "sub/deeper", "../in", "link"])
def test_output_that_is_the_input_is_refused(command, out, tmp_path, monkeypatch, capsys):
  inp = tmp_path / "in"
  (inp / "sub").mkdir(parents=True)
  (inp / "face.png").write_bytes(b"original")
  (tmp_path / "link").symlink_to(inp)  # --out reaching --in through a link
  monkeypatch.chdir(inp)
  out = str(tmp_path / out) if out == "link" else out
  rc = cli.main([command, "--workdir", str(tmp_path / "run"), "--in", ".", "--out", out, "--force"])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith(f"erasablemask {command}: the output is the input: --out {out} is")
  assert err.count("\n") == 1
  assert (inp / "face.png").read_bytes() == b"original"
  assert sorted(p.name for p in inp.rglob("*")) == ["face.png", "sub"]


@pytest.mark.parametrize("out", ["../in-protected", "../out", ".."])
def test_output_beside_or_above_the_input_is_allowed(out, tmp_path, monkeypatch, capsys):
  (tmp_path / "in").mkdir()
  monkeypatch.chdir(tmp_path / "in")
  rc = cli.main(["protect", "--aligned", "--workdir", str(tmp_path / "run"), "--in", ".", "--out", out])
  assert rc == 1 and "not a training run" in capsys.readouterr().err  # past the check, stopped by the missing run


def test_erase_restores_with_the_sidecar_attributes(protected, loaded_run, tmp_path, capsys):
  out = protected["out"]
  erased = tmp_path / "erased"
  rc = cli.main(["erase", "--workdir", str(loaded_run.workdir), "--in", str(out), "--out", str(erased)])
  assert rc == 0
  state, models = loaded_run.state, loaded_run.models
  for f in FACES:
    side = json.loads((out / f.replace(".png", ".json")).read_text())
    x_adv = inference.to_model_input(_png(out / f)[None])
    x_rec, _ = models.restore(state.r.variables, jax.numpy.asarray(x_adv), np.asarray([side["att_a"]], np.float32))
    assert np.abs(_png(erased / f).astype(int) - to_uint8(np.asarray(x_rec))[0]).max() <= 1
  # Existing outputs are refused without --force.
  rc = cli.main(["erase", "--workdir", str(loaded_run.workdir), "--in", str(out), "--out", str(erased)])
  assert rc == 1 and "pass --force" in capsys.readouterr().err


def test_erase_missing_sidecar_is_skipped_or_given_source_attrs(protected, loaded_run, tmp_path, capsys):
  import shutil
  from erasablemask_jax.inference import folders
  inp = tmp_path / "prot"
  shutil.copytree(protected["out"], inp)
  (inp / FACES[0].replace(".png", ".json")).unlink()
  (inp / FACES[1].replace(".png", ".json")).write_text("{not json")
  result = folders.erase_folder(loaded_run, inp, tmp_path / "a", progress=False)
  assert sorted(result.written) == sorted(FACES[2:])
  assert "no sidecar" in result.skipped[FACES[0]] and "not valid JSON" in result.skipped[FACES[1]]
  # --source-attrs bits restores the image without a sidecar (the malformed one is still refused).
  bits = "0000100000101"
  result = folders.erase_folder(loaded_run, inp, tmp_path / "b", source_attrs=f"bits:{bits}", progress=False)
  assert FACES[0] in result.written and FACES[1] in result.skipped
  x_adv = inference.to_model_input(_png(inp / FACES[0])[None])
  x_rec, _ = loaded_run.models.restore(loaded_run.state.r.variables, jax.numpy.asarray(x_adv),
                                       attributes.parse_bits(bits)[None])
  assert np.abs(_png(tmp_path / "b" / FACES[0]).astype(int) - to_uint8(np.asarray(x_rec))[0]).max() <= 1
  # The documented approximation: D_att's prediction with the recorded flipped attributes inverted.
  result = folders.erase_folder(loaded_run, inp, tmp_path / "c", source_attrs="predicted", progress=False)
  assert len(result.written) == len(FACES) - 1
  x_adv = inference.to_model_input(_png(inp / FACES[2])[None])
  _, logits = loaded_run.models.discriminate(loaded_run.state.d.variables, jax.numpy.asarray(x_adv))
  guess = attributes.invert((np.asarray(logits[0]) > 0).astype(np.float32), ["Eyeglasses", "Male"])
  x_rec, _ = loaded_run.models.restore(loaded_run.state.r.variables, jax.numpy.asarray(x_adv), guess[None])
  assert np.abs(_png(tmp_path / "c" / FACES[2]).astype(int) - to_uint8(np.asarray(x_rec))[0]).max() <= 1


def test_erase_skips_a_sidecar_without_checkpoint_and_keeps_going(protected, loaded_run, tmp_path, capsys):
  import shutil
  inp = tmp_path / "prot"
  shutil.copytree(protected["out"], inp)
  path = inp / FACES[0].replace(".png", ".json")
  side = json.loads(path.read_text())
  del side["checkpoint"]
  path.write_text(json.dumps(side))
  rc = cli.main(["erase", "--workdir", str(loaded_run.workdir), "--in", str(inp), "--out", str(tmp_path / "e")])
  out = capsys.readouterr().out
  assert rc == 0 and f"{len(FACES) - 1} written, 1 skipped" in out
  assert f'{FACES[0]}: sidecar {path} has no "checkpoint" entry' in out
  assert out.splitlines()[-1] == f"erasablemask erase: outputs in {tmp_path / 'e'} (a restored PNG per image)"


def _bomb_png(side=60000) -> bytes:
  """A PNG whose header claims side x side pixels (3.6 gigapixels) in a few hundred bytes."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_protect_skips_a_decompression_bomb_and_names_its_outputs(tmp_path, tiny_run, capsys):
  inp = copy_faces(tmp_path / "in", FACES[:1])
  (inp / "bomb.png").write_bytes(_bomb_png())
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(inp), "--out", str(tmp_path / "out")])
  lines = capsys.readouterr().out.splitlines()
  assert rc == 0 and "1 written, 1 skipped" in lines[0]
  assert any(l.strip().startswith("bomb.png: too large: Image size (3600000000 pixels) exceeds limit") for l in lines)
  assert lines[-1] == f"erasablemask protect: outputs in {tmp_path / 'out'} (a PNG and a JSON sidecar per image)"


def test_protect_on_a_full_disk_is_one_line(tmp_path, tiny_run, monkeypatch, capsys):
  import errno
  import os

  def full(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(sidecar, "write_bytes_atomic", full)
  inp = copy_faces(tmp_path / "in", FACES[:1])
  rc = cli.main(["protect", "--aligned", "--workdir", str(tiny_run), "--in", str(inp), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err  # the progress bar's line (closed first), then the error's
  assert rc == 1 and "Traceback" not in err
  assert err.splitlines()[-1] == (f"erasablemask protect: {tmp_path / 'out' / FACES[0]}: No space left on device; "
                                  "free some space or write to another disk")
  assert sum("erasablemask" in line for line in err.splitlines()) == 1
