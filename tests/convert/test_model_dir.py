"""Model directories: `--force` replaces only a model directory, atomically, and the result has the usual modes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from erasablemask_jax.convert import model_dir as model_dir_lib
from tools.convert_torch_weights.__main__ import main as convert_main

VARIABLES = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}


@pytest.fixture(name="umask_022", autouse=True)
def _umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_written_directory_has_the_usual_modes(tmp_path):
  out = model_dir_lib.write_model_dir(tmp_path / "model", VARIABLES, {"arch": "tiny"})
  assert _mode(out) == 0o755 and _mode(out / "card.json") == 0o644
  assert all(_mode(p) == (0o755 if p.is_dir() else 0o644) for p in out.rglob("*"))
  assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary directory left beside it


def test_force_replaces_a_model_directory(tmp_path):
  out = tmp_path / "model"
  model_dir_lib.write_model_dir(out, VARIABLES, {"arch": "old"})
  with pytest.raises(model_dir_lib.ModelDirError, match="already exists"):
    model_dir_lib.write_model_dir(out, VARIABLES, {"arch": "new"})
  model_dir_lib.write_model_dir(out, VARIABLES, {"arch": "new"}, force=True)
  variables, card = model_dir_lib.read_model_dir(out)
  assert card == {"arch": "new"}
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], VARIABLES["params"]["dense"]["kernel"])
  assert sorted(os.listdir(tmp_path)) == ["model"] and _mode(out) == 0o755


def test_failed_write_keeps_the_old_model(tmp_path):
  out = tmp_path / "model"
  model_dir_lib.write_model_dir(out, VARIABLES, {"arch": "old"})
  with pytest.raises(TypeError):  # the card is not JSON: fails after the variables were written to the temporary
    model_dir_lib.write_model_dir(out, VARIABLES, {"arch": object()}, force=True)
  assert model_dir_lib.read_card(out) == {"arch": "old"}
  assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("target", ["folder", "cwd"])
def test_force_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch, capsys, target):
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "keep.jpg").write_bytes(b"mine")
  out = str(folder)
  if target == "cwd":
    monkeypatch.chdir(folder)
    out = "."
  with pytest.raises(model_dir_lib.ModelDirError, match="has no card.json"):
    model_dir_lib.write_model_dir(out, VARIABLES, {"arch": "tiny"}, force=True)
  # The converter's command line: one line, exit 1, checked before the checkpoint is even opened.
  rc = convert_main(["--arch", "mobilefacenet", "--checkpoint", str(tmp_path / "absent.pth"), "--out", out, "--force"])
  err = capsys.readouterr().err
  assert rc == 1 and "has no card.json" in err and err.count("\n") == 1
  assert sorted(os.listdir(folder)) == ["keep.jpg"] and sorted(os.listdir(tmp_path)) == ["photos"]


@pytest.mark.parametrize("text, message", [("{\"arch\": \"mobilefacenet\",", "is not valid JSON"),
                                           ("[1, 2]", "holds a JSON list, not the model card's object")])
def test_a_corrupt_card_is_named(tmp_path, text, message, capsys):
  import shutil

  from erasablemask_jax import cli
  from erasablemask_jax import fr
  model = tmp_path / "model"
  shutil.copytree(fr.bundled_dir(), model)
  (model / "card.json").write_text(text)
  with pytest.raises(model_dir_lib.ModelDirError, match=f"{model / 'card.json'} {message}"):
    model_dir_lib.read_card(model)
  (tmp_path / "faces").mkdir()
  (tmp_path / "ids.txt").write_text("")
  assert cli.main(["calibrate", "--fr", str(model), "--faces", str(tmp_path / "faces"), "--identities",
                   str(tmp_path / "ids.txt"), "--out", str(tmp_path / "cal.json")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{model / 'card.json'} {message}" in err
