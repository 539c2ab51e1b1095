"""`erasablemask align`: outputs are never overwritten without --force, errors go to stderr, the last line names OUT."""

import shutil

from erasablemask_jax import cli
from erasablemask_jax.data import builders

FACE = "deepface_img12.png"


def test_align_refuses_to_overwrite_without_force(tmp_path, capsys):
  photos = tmp_path / "photos"
  photos.mkdir()
  shutil.copy(builders.resolve_manual_dir("bundled:sample_faces") / FACE, photos / FACE)
  (photos / "notes.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  out = tmp_path / "aligned"
  argv = ["align", str(photos), str(out), "--size", "64", "--templates", "loose"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[-1] == f"erasablemask align: outputs in {out} (loose_64/, alignment_meta.json, align_report.json)"
  crop = out / "loose_64" / FACE
  before = crop.stat().st_mtime_ns
  assert cli.main(argv) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("\n") == 1 and "output file(s) exist" in captured.err and "pass --force" in captured.err
  assert crop.stat().st_mtime_ns == before
  assert cli.main(argv + ["--force"]) == 0 and crop.stat().st_mtime_ns != before


def test_align_errors_go_to_stderr(tmp_path, capsys):
  assert cli.main(["align", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == f"erasablemask align: {tmp_path / 'nope'} is not a folder of photos\n"
  assert cli.main(["align", str(tmp_path), str(tmp_path / "out"), "--templates", "wide"]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and "--templates 'wide': choose among" in captured.err
  assert cli.main(["align", str(tmp_path), str(tmp_path / "out"), "--size", "8"]) == 2
  assert "must be at least 16" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
