"""MXNet `.params` / `-symbol.json` reading, the `arg:`/`aux:` rename, and the converter's MXNet path and errors.

The `.params` files here are written by `_write_params`, an encoder of the NDArray-list format written from the
format description (`MANIFEST.md`), not from the reader.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from erasablemask_jax import convert
from erasablemask_jax import fr
from erasablemask_jax.convert import mxnet
from erasablemask_jax.fr import mobileface_v2
from tools.convert_torch_weights.__main__ import main as convert_main

TYPE_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2, np.dtype(np.uint8): 3,
              np.dtype(np.int32): 4, np.dtype(np.int8): 5, np.dtype(np.int64): 6}
MODEL_DIR = "models/becauseofai_mobileface_v2"
PARAMS = "MobileFace_Identification_V2-0000.params"
SYMBOL = "MobileFace_Identification_V2-symbol.json"


def _encode_array(a: np.ndarray, version: str, stype: int = 0, type_flag: int | None = None) -> bytes:
  a = np.ascontiguousarray(a)
  if version == "v2":
    head = struct.pack("<IiI", 0xF993FAC9, stype, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
  elif version == "v1":
    head = struct.pack("<II", 0xF993FAC8, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
  else:
    head = struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
  flag = TYPE_FLAGS[a.dtype] if type_flag is None else type_flag
  return head + struct.pack("<iii", 1, 0, flag) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def _write_params(path, arrays, version="v2", named=True, **kw):
  """`nd.save(path, arrays)`: list header, the arrays, then the names (none for a list save)."""
  blob = struct.pack("<QQQ", 0x112, 0, len(arrays)) + b"".join(_encode_array(a, version, **kw)
                                                                 for a in arrays.values())
  names = list(arrays) if named else []
  blob += struct.pack("<Q", len(names)) + b"".join(struct.pack("<Q", len(n.encode())) + n.encode() for n in names)
  path.write_bytes(blob)
  return path


def _arrays(rng):
  return {"arg:conv_weight": rng.randn(4, 3, 3, 3).astype(np.float32),
          "arg:fc_weight": rng.randn(5, 6),
          "aux:bn_moving_var": rng.rand(4).astype(np.float16),
          "arg:ids": rng.randint(0, 255, (2, 3)).astype(np.uint8),
          "arg:i32": rng.randint(-9, 9, (7,)).astype(np.int32),
          "arg:i8": rng.randint(-9, 9, (1, 2, 1)).astype(np.int8),
          "arg:i64": np.asarray([2**40, -3], np.int64)}


@pytest.mark.parametrize("version", ["v2", "v1", "legacy"])
def test_reader_round_trips_every_dtype(tmp_path, version):
  arrays = _arrays(np.random.RandomState(0))
  got = mxnet.read_ndarray_list(_write_params(tmp_path / "m-0003.params", arrays, version))
  assert list(got) == list(arrays)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape
    np.testing.assert_array_equal(got[k], v)


def test_reader_list_without_names(tmp_path):
  arrays = {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2), np.float64)}
  got = mxnet.read_ndarray_list(_write_params(tmp_path / "x.params", arrays, named=False))
  assert list(got) == ["0", "1"]
  np.testing.assert_array_equal(got["1"], arrays["b"])


def _error(path) -> str:
  with pytest.raises(convert.CheckpointError) as e:
    mxnet.read_ndarray_list(path)
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg
  return msg


@pytest.mark.parametrize("version", ["v2", "v1", "legacy"])
def test_truncated_file_is_a_one_line_error(tmp_path, version):
  data = _write_params(tmp_path / "w.params", _arrays(np.random.RandomState(1)), version).read_bytes()
  for cut in (4, 30, len(data) // 2, len(data) - 3):
    path = tmp_path / f"cut{cut}.params"
    path.write_bytes(data[:cut])
    assert "truncated" in _error(path) or "shorter than the header" in _error(path)


def test_bad_magic_sparse_and_dtype_errors(tmp_path):
  arrays = {"arg:w": np.ones((2, 2), np.float32)}
  good = _write_params(tmp_path / "good.params", arrays).read_bytes()
  (tmp_path / "header.params").write_bytes(b"PK\x03\x04" + good[4:])
  assert "not an MXNet NDArray file" in _error(tmp_path / "header.params")
  (tmp_path / "magic.params").write_bytes(good[:24] + struct.pack("<I", 0xDEADBEEF) + good[28:])
  assert "not an NDArray magic" in _error(tmp_path / "magic.params")
  _write_params(tmp_path / "sparse.params", arrays, stype=1)
  assert "row_sparse storage" in _error(tmp_path / "sparse.params")
  _write_params(tmp_path / "csr.params", arrays, stype=2)
  assert "csr storage" in _error(tmp_path / "csr.params")
  _write_params(tmp_path / "bf16.params", arrays, type_flag=12)
  assert "type flag 12" in _error(tmp_path / "bf16.params")
  (tmp_path / "trailing.params").write_bytes(good + b"\0")
  assert "trailing bytes" in _error(tmp_path / "trailing.params")


# ----- symbol graph -----


def _tiny_graph(tmp_path, stride="(2, 2)", fix_gamma="False"):
  """data -> *2 -> conv (2 groups, bias) -> BN -> relu6 -> + itself -> Flatten -> FC (no bias)."""
  nodes = [
      {"op": "null", "name": "data", "inputs": []},
      {"op": "_mul_scalar", "name": "_mulscalar0", "attrs": {"scalar": "2"}, "inputs": [[0, 0, 0]]},
      {"op": "null", "name": "c_weight", "inputs": []},
      {"op": "null", "name": "c_bias", "inputs": []},
      {"op": "Convolution", "name": "c", "inputs": [[1, 0, 0], [2, 0, 0], [3, 0, 0]],
       "attrs": {"kernel": "(3, 3)", "num_filter": "4", "num_group": "2", "pad": "(1, 1)", "stride": stride}},
      {"op": "null", "name": "b_gamma", "inputs": []},
      {"op": "null", "name": "b_beta", "inputs": []},
      {"op": "null", "name": "b_moving_mean", "inputs": []},
      {"op": "null", "name": "b_moving_var", "inputs": []},
      {"op": "BatchNorm", "name": "b", "attrs": {"fix_gamma": fix_gamma},
       "inputs": [[4, 0, 0], [5, 0, 0], [6, 0, 0], [7, 0, 0], [8, 0, 0]]},
      {"op": "_maximum_scalar", "name": "mx", "attrs": {"scalar": "0"}, "inputs": [[9, 0, 0]]},
      {"op": "_minimum_scalar", "name": "mn", "attrs": {"scalar": "6"}, "inputs": [[10, 0, 0]]},
      {"op": "elemwise_add", "name": "_plus0", "inputs": [[11, 0, 0], [11, 0, 0]]},
      {"op": "Flatten", "name": "flatten0", "inputs": [[12, 0, 0]]},
      {"op": "null", "name": "fc_weight", "inputs": []},
      {"op": "FullyConnected", "name": "fc", "attrs": {"no_bias": "True", "num_hidden": "3"},
       "inputs": [[13, 0, 0], [14, 0, 0]]},
  ]
  path = tmp_path / "tiny-symbol.json"
  path.write_text(json.dumps({"nodes": nodes, "arg_nodes": [0, 2, 3, 5, 6, 7, 8, 14], "heads": [[15, 0, 0]]}))
  return path


def test_symbol_shapes_and_param_check(tmp_path):
  graph = mxnet.read_symbol(_tiny_graph(tmp_path))
  assert graph.ops()["Convolution"] == 1 and graph.aux_names() == {"b_moving_mean", "b_moving_var"}
  shapes = mxnet.infer_param_shapes(graph, (1, 6, 8, 8))
  assert shapes == {"arg:c_weight": (4, 3, 3, 3), "arg:c_bias": (4,), "arg:b_gamma": (4,), "arg:b_beta": (4,),
                    "aux:b_moving_mean": (4,), "aux:b_moving_var": (4,), "arg:fc_weight": (3, 64)}
  assert sorted(graph.param_keys()) == sorted(shapes)
  assert mxnet.graph_layers(graph)["b"] == {"op": "BatchNorm", "eps": 1e-3, "fix_gamma": False, "axis": 1}
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  mxnet.check_params_match_symbol(params, graph, (1, 6, 8, 8))
  params["arg:fc_weight"] = np.zeros((3, 60), np.float32)
  params["arg:extra_weight"] = np.zeros(2, np.float32)
  del params["aux:b_moving_var"]
  with pytest.raises(convert.CheckpointError) as e:
    mxnet.check_params_match_symbol(params, graph, (1, 6, 8, 8), context="tiny.params")
  msg = str(e.value)
  assert "1 in the graph but not the params (aux:b_moving_var)" in msg
  assert "1 in the params but not the graph (arg:extra_weight)" in msg
  assert "arg:fc_weight (3, 60) vs graph (3, 64)" in msg


def test_symbol_path_and_bad_symbol(tmp_path):
  (tmp_path / "net-symbol.json").write_text("{}")
  (tmp_path / "net-0012.params").write_bytes(b"")
  assert mxnet.symbol_path_for(tmp_path / "net-0012.params") == tmp_path / "net-symbol.json"
  assert mxnet.symbol_path_for(tmp_path / "other-0001.params") is None
  with pytest.raises(convert.CheckpointError, match="not an MXNet symbol graph"):
    mxnet.read_symbol(tmp_path / "net-symbol.json")


def test_layer_check_names_the_differences(tmp_path):
  expected = mxnet.graph_layers(mxnet.read_symbol(_tiny_graph(tmp_path)))
  other = mxnet.read_symbol(_tiny_graph(tmp_path, stride="(1, 1)", fix_gamma="True"))
  with pytest.raises(convert.CheckpointError) as e:
    mxnet.check_layers(other, expected)
  msg = str(e.value)
  assert "c stride=(1, 1) (architecture (2, 2))" in msg and "b fix_gamma=True (architecture False)" in msg


# ----- rename -----


def test_rename_table_layouts():
  rng = np.random.RandomState(2)
  params = {"arg:c_weight": rng.randn(8, 3, 3, 3), "arg:c_bias": rng.randn(8), "arg:dw_weight": rng.randn(8, 1, 3, 3),
            "arg:b_gamma": rng.randn(8), "arg:b_beta": rng.randn(8), "aux:b_moving_mean": rng.randn(8),
            "aux:b_moving_var": rng.rand(8), "arg:fc_weight": rng.randn(5, 2 * 3 * 4), "arg:odd": rng.randn(2),
            "aux:c_weight": rng.randn(2)}
  flat = mxnet.mxnet_to_flax_flat(params, nchw_flatten={"fc": (2, 3, 4)})
  np.testing.assert_array_equal(flat["params/c/kernel"], params["arg:c_weight"].transpose(2, 3, 1, 0))
  assert flat["params/dw/kernel"].shape == (3, 3, 1, 8)
  assert flat["params/b/scale"] is params["arg:b_gamma"] and flat["batch_stats/b/var"] is params["aux:b_moving_var"]
  # fc rows follow the NHWC flatten: kernel[h*W*C + w*C + c] == weight[:, c*H*W + h*W + w].
  x = rng.randn(3, 4, 2)  # (H, W, C)
  np.testing.assert_allclose(x.reshape(-1) @ flat["params/fc/kernel"],
                             params["arg:fc_weight"] @ x.transpose(2, 0, 1).reshape(-1), rtol=1e-12)
  assert {"unmapped/arg:odd", "unmapped/aux:c_weight"} <= set(flat)


# ----- the converter on synthetic MobileFace V2 files -----


def _to_mxnet(variables_flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flax MobileFaceV2 variables -> MXNet `arg:`/`aux:` arrays (the inverse layouts, written out here)."""
  c, h, w = mobileface_v2.FC_INPUT_CHW
  out = {}
  for key, v in variables_flat.items():
    collection, layer, leaf = key.split("/")
    if leaf == "kernel" and v.ndim == 4:
      out[f"arg:{layer}_weight"] = v.transpose(3, 2, 0, 1)
    elif leaf == "kernel":  # (h*w*c, out) rows in NHWC order -> (out, c*h*w)
      out[f"arg:{layer}_weight"] = v.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(v.shape[1], -1)
    elif collection == "batch_stats":
      out[f"aux:{layer}_moving_{leaf}"] = v
    else:
      bn = f"params/{layer}/scale" in variables_flat
      out[f"arg:{layer}_{({'scale': 'gamma', 'bias': 'beta'}[leaf] if bn else leaf)}"] = v
  return out


def _random_mobileface_v2(setting=mobileface_v2.SETTING, seed=0):
  abstract = convert.abstract_init(mobileface_v2.MobileFaceV2(setting), (112, 112, 3))
  rng = np.random.RandomState(seed)
  flat = {k: (rng.rand(*v.shape) + 0.5 if k.endswith("/var") else rng.randn(*v.shape) * 0.1).astype(np.float32)
          for k, v in convert.flatten_variables(abstract).items()}
  return flat, _to_mxnet(flat)


@pytest.fixture(name="synthetic", scope="module")
def _synthetic(tmp_path_factory):
  flat, params = _random_mobileface_v2()
  path = _write_params(tmp_path_factory.mktemp("mxnet") / "synthetic-0000.params", params)
  return flat, params, path


def test_parameter_count_and_graph_table():
  flat, params = _random_mobileface_v2()
  assert sum(v.size for v in flat.values()) == 892384 and len(params) == 191
  layers = mobileface_v2.mxnet_layers()
  ops = [v["op"] for v in layers.values()]
  assert ops.count("Convolution") == 37 and ops.count("BatchNorm") == 38 and ops.count("FullyConnected") == 1
  assert sum(residual for *_, residual in mobileface_v2.blocks()) == 8


def test_convert_synthetic_params_round_trip(synthetic, tmp_path):
  flat, _, path = synthetic
  out = tmp_path / "model"
  assert convert_main(["--arch", "mobileface_v2", "--checkpoint", str(path), "--out", str(out)]) == 0
  recogniser = fr.load(out)
  assert recogniser.card["source"] == {"file": path.name, "sha256": convert.sha256_file(path), "format": "mxnet"}
  got = convert.flatten_variables(recogniser.variables)
  assert sorted(got) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v)
  assert recogniser.embed(np.zeros((1, 112, 112, 3), np.uint8)).shape == (1, 256)


def _fails(argv, capsys) -> str:
  assert convert_main(argv) == 1
  return capsys.readouterr().err


def test_missing_unexpected_and_wrong_arch_errors(synthetic, tmp_path, capsys):
  _, params, _ = synthetic
  before = sorted(os.listdir(tmp_path))
  broken = dict(params)
  del broken["aux:batchnorm7_moving_var"]
  broken["arg:extra_weight"] = np.zeros((3, 3), np.float32)
  path = _write_params(tmp_path / "broken-0000.params", broken)
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(path), "--out", str(tmp_path / "a")], capsys)
  assert "1 missing, 1 unexpected, 0 mis-shaped" in err
  assert "batch_stats/batchnorm7/var" in err and "params/extra/kernel" in err
  # A smaller network of the same family: many keys, listed only in part.
  _, small = _random_mobileface_v2(((3, 32, 1, 2), (3, 32, 1, 2), (3, 64, 1, 2), (3, 128, 1, 2)))
  path = _write_params(tmp_path / "small-0000.params", small)
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(path), "--out", str(tmp_path / "b")], capsys)
  assert "120 missing, 0 unexpected, 20 mis-shaped" in err and "... and 110 more" in err
  assert "params/batchnorm10/bias: checkpoint (192,) vs model (96,)" in err and "different --arch" in err
  # PyTorch architecture for an MXNet file, and the other way round.
  err = _fails(["--arch", "mobilefacenet", "--checkpoint", str(synthetic[2]), "--out", str(tmp_path / "c")], capsys)
  assert "is in the MXNet format, but --arch mobilefacenet converts PyTorch checkpoints" in err
  (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not mxnet")
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(tmp_path / "w.pth"), "--out", str(tmp_path / "d")],
               capsys)
  assert "is in the PyTorch format, but --arch mobileface_v2 converts MXNet checkpoints" in err
  err = _fails(["--arch", "mobilefacenet", "--checkpoint", str(tmp_path / "w.pth"), "--symbol", "x-symbol.json",
                "--out", str(tmp_path / "e")], capsys)
  assert "only MXNet .params checkpoints have a symbol graph" in err
  # Truncated.
  data = synthetic[2].read_bytes()
  (tmp_path / "cut-0000.params").write_bytes(data[:len(data) // 3])
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(tmp_path / "cut-0000.params"),
                "--out", str(tmp_path / "f")], capsys)
  assert "truncated" in err and "cut-0000.params" in err
  assert not any((tmp_path / d).exists() for d in "abcdef")
  assert sorted(os.listdir(tmp_path)) == sorted(before + ["broken-0000.params", "small-0000.params", "w.pth",
                                                           "cut-0000.params"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused(synthetic, tmp_path, capsys, bad):
  _, params, _ = synthetic
  params = dict(params)
  params["arg:convolution4_weight"] = params["arg:convolution4_weight"].copy()
  params["arg:convolution4_weight"][0, 0, 1, 1] = bad
  path = _write_params(tmp_path / "nan-0000.params", params)
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(path), "--out", str(tmp_path / "out")], capsys)
  assert "refused" in err and "NaN/Inf" in err and "arg:convolution4_weight (1 of 864)" in err
  assert not (tmp_path / "out").exists()


# ----- the real graph beside the real params -----


@pytest.mark.assets
def test_real_graph_matches_architecture_and_params(assets_dir):
  graph = mxnet.read_symbol(assets_dir / MODEL_DIR / SYMBOL)
  assert graph.ops() == {"_minus_scalar": 1, "_mul_scalar": 1, "Convolution": 37, "BatchNorm": 38,
                         "_maximum_scalar": 25, "_minimum_scalar": 25, "elemwise_add": 8, "Flatten": 1,
                         "FullyConnected": 1}
  mxnet.check_layers(graph, mobileface_v2.mxnet_layers())
  params = mxnet.read_ndarray_list(assets_dir / MODEL_DIR / PARAMS)
  mxnet.check_params_match_symbol(params, graph, (1, 3, 112, 112))
  assert sum(v.size for v in params.values()) == 892384
  assert {k: v.shape for k, v in params.items()} == dict(mxnet.infer_param_shapes(graph, (1, 3, 112, 112)))


@pytest.mark.assets
def test_symbol_mismatches_are_refused(assets_dir, tmp_path, capsys):
  src = assets_dir / MODEL_DIR
  params = mxnet.read_ndarray_list(src / PARAMS)
  del params["arg:fc5_weight"]
  shutil.copy(src / SYMBOL, tmp_path / "cut-symbol.json")  # found beside cut-0000.params by MXNet naming
  path = _write_params(tmp_path / "cut-0000.params", params)
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(path), "--out", str(tmp_path / "a")], capsys)
  assert "do not match: 1 in the graph but not the params (arg:fc5_weight)" in err
  # An explicit --symbol whose graph differs in a computation attribute (not visible in parameter shapes).
  raw = json.loads((src / SYMBOL).read_text())
  for node in raw["nodes"]:
    if node["name"] == "convolution19":
      node["attrs"]["stride"] = "(1, 1)"
    if node["name"] == "batchnorm3":
      node["attrs"]["eps"] = "1e-05"
  (tmp_path / "edited.json").write_text(json.dumps(raw))
  err = _fails(["--arch", "mobileface_v2", "--checkpoint", str(src / PARAMS), "--symbol", str(tmp_path / "edited.json"),
                "--out", str(tmp_path / "b")], capsys)
  assert "is not this architecture" in err and "2 layers with other attributes" in err
  assert "convolution19 stride=(1, 1) (architecture (2, 2))" in err and "batchnorm3 eps=1e-05" in err
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
