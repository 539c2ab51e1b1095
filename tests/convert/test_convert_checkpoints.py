"""Checkpoint reading, strict merging and model directories, including every bad input (nothing written)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from erasablemask_jax import convert  # pylint: disable=wrong-import-position
from erasablemask_jax import fr  # pylint: disable=wrong-import-position
from tools.convert_torch_weights.__main__ import main as convert_main  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.torch


def _tiny_state():
  return {"conv.weight": torch.randn(4, 3, 3, 3), "bn.weight": torch.rand(4), "bn.bias": torch.rand(4),
          "bn.running_mean": torch.rand(4), "bn.running_var": torch.rand(4) + 0.5,
          "bn.num_batches_tracked": torch.tensor(3)}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "net_state_dict", "model", "module_prefix"])
def test_read_state_dict_unwraps(tmp_path, wrap):
  state = _tiny_state()
  obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "net_state_dict": {"net_state_dict": state},
         "model": {"model": state, "optimizer": {}}, "module_prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
  torch.save(obj, tmp_path / "w.pth")
  got = convert.read_state_dict(tmp_path / "w.pth")
  assert sorted(got) == sorted(state)
  np.testing.assert_array_equal(got["conv.weight"], state["conv.weight"].numpy())


def test_read_safetensors(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = {k: v.numpy() for k, v in _tiny_state().items()}
  save_file(state, str(tmp_path / "w.safetensors"))
  got = convert.read_state_dict(tmp_path / "w.safetensors")
  np.testing.assert_array_equal(got["bn.running_var"], state["bn.running_var"])


def test_generic_rename_layouts():
  state = {k: v.numpy() for k, v in _tiny_state().items()}
  state.update({"fc.weight": np.ones((5, 4), np.float32), "act.weight": np.full(4, 0.2, np.float32),
                "odd.thing": np.zeros(2, np.float32)})
  flat = convert.torch_to_flax_flat(state)
  assert flat["params/conv/kernel"].shape == (3, 3, 3, 4)
  assert flat["params/fc/kernel"].shape == (4, 5)
  assert set(k for k in flat if "/bn/" in k) == {"params/bn/scale", "params/bn/bias", "batch_stats/bn/mean",
                                                 "batch_stats/bn/var"}
  assert "params/act/negative_slope" in flat and "unmapped/odd.thing" in flat
  assert convert.default_module_path("features.3.conv.0.1") == "features_3/conv_0_1"


def test_strict_merge_names_every_problem():
  spec = convert.get_arch("mobilefacenet")
  abstract = convert.abstract_init(spec.build(), spec.input_shape)
  flat = {k: np.zeros(v.shape, v.dtype) for k, v in convert.flatten_variables(abstract).items()}
  del flat["params/conv3/bias"]
  flat["params/extra/kernel"] = np.zeros(3)
  flat["params/conv1_0/kernel"] = np.zeros((3, 3, 3, 8), np.float32)
  with pytest.raises(convert.StrictMergeError) as e:
    convert.strict_merge(flat, abstract)
  msg = str(e.value)
  assert "params/conv3/bias" in msg and "params/extra/kernel" in msg and "params/conv1_0/kernel" in msg
  assert "1 missing, 1 unexpected, 1 mis-shaped" in msg


@pytest.fixture(name="foam_like_checkpoint")
def _foam_like_checkpoint(tmp_path):
  from benchmarks import torch_nets as ref  # pylint: disable=g-import-not-at-top
  model = ref.randomise(ref.build("mobilefacenet"), 0, (112, 112, 3))
  path = tmp_path / "mfn.pth"
  torch.save(model.state_dict(), path)
  return model, path


def test_convert_load_and_embed(foam_like_checkpoint, tmp_path):
  model, path = foam_like_checkpoint
  out = tmp_path / "out"
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(path), "--out", str(out)]) == 0
  card = json.loads((out / "card.json").read_text())
  assert card["arch"] == "mobilefacenet" and card["source"]["sha256"] == convert.sha256_file(path)
  assert card["input_size"] == [112, 112] and card["embedding_size"] == 128
  recogniser = fr.load(out)
  rng = np.random.RandomState(0)
  big = rng.randint(0, 256, (2, 150, 130, 3)).astype(np.uint8)  # any size: resized (antialiased) to 112x112
  e = recogniser.embed(big)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(e, recogniser.embed(big.astype(np.float32) / 127.5 - 1.0), atol=1e-5)
  # --force replaces; without it an existing directory is refused.
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(path), "--out", str(out)]) == 1
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(path), "--out", str(out), "--force"]) == 0


def _listing(d):
  return sorted(os.listdir(d))


def test_bad_inputs_write_nothing(foam_like_checkpoint, tmp_path, capsys):
  _, path = foam_like_checkpoint
  before = _listing(tmp_path)
  # Wrong architecture.
  assert convert_main(["--arch", "mobilefacenet_sphereface", "--checkpoint", str(path),
                       "--out", str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert "missing" in err and "unexpected" in err and "different --arch" in err
  # Truncated file.
  data = path.read_bytes()
  (tmp_path / "trunc.pth").write_bytes(data[:len(data) // 2])
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(tmp_path / "trunc.pth"),
                       "--out", str(tmp_path / "b")]) == 1
  assert "truncated" in capsys.readouterr().err
  # A pickle that carries code.
  torch.save({"state_dict": torch.load(path, weights_only=True), "hook": os.getcwd}, tmp_path / "unsafe.pth")
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(tmp_path / "unsafe.pth"),
                       "--out", str(tmp_path / "c")]) == 1
  assert "refused" in capsys.readouterr().err
  # Existing output.
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "keep.txt").write_text("mine")
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(path), "--out", str(tmp_path / "d")]) == 1
  assert "already exists" in capsys.readouterr().err
  assert _listing(tmp_path / "d") == ["keep.txt"]
  assert _listing(tmp_path) == sorted(before + ["trunc.pth", "unsafe.pth", "d"])


def test_a_wrong_architecture_is_summarised_with_the_likely_one(foam_like_checkpoint, tmp_path, capsys):
  _, path = foam_like_checkpoint
  assert convert_main(["--arch", "iresnet50", "--checkpoint", str(path), "--out", str(tmp_path / "a")]) == 1
  err = capsys.readouterr().err
  assert len(err.splitlines()) <= 3 * (convert.checkpoint.LISTED_KEYS + 2) + 2, err
  first = err.splitlines()[0]
  assert "checkpoint does not match the model (--arch iresnet50, checkpoint mfn.pth)" in first
  assert "missing" in first and "unexpected" in first and "more" in err
  assert err.splitlines()[-1].strip() == ("The checkpoint is for a different --arch: it looks like --arch mobilefacenet "
                                          "(every tensor matches).")
  assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_torch_weights_are_refused(foam_like_checkpoint, tmp_path, bad, capsys):
  model, _ = foam_like_checkpoint
  state = model.state_dict()
  name = next(k for k, v in state.items() if v.dtype == torch.float32 and v.ndim == 4)
  state[name] = state[name].clone()
  state[name].view(-1)[:3] = bad
  torch.save(state, tmp_path / "diverged.pth")
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(tmp_path / "diverged.pth"), "--out",
                       str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert f"refused: 1 tensors hold NaN/Inf ({name} (3 of {state[name].numel()})); the checkpoint is damaged" in err
  assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_checkpoint_says_what_is_in_it(foam_like_checkpoint, tmp_path, capsys):
  _, path = foam_like_checkpoint
  argv = ["--arch", "mobilefacenet", "--out", str(tmp_path / "out"), "--checkpoint"]
  assert convert_main(argv + [str(path.parent)]) == 1
  assert ("is a folder, not a weights file; pass one of the weight files in it: mfn.pth"
          in capsys.readouterr().err)
  (tmp_path / "empty").mkdir()
  assert convert_main(argv + [str(tmp_path / "empty")]) == 1
  assert "is a folder, not a weights file; it holds no weight file (.pth" in capsys.readouterr().err
  assert convert_main(argv + [str(tmp_path / "nothing.pth")]) == 1
  assert "does not exist" in capsys.readouterr().err
