"""TF.js graph models: the numpy reader (`convert.tfjs`), its refusals, and the interpreter (`fr.tfjs_graph`) on
synthetic graphs that use what TF.js's converter emits (fused ops with their `fused_ops` lists, explicit paddings,
asymmetric SAME padding, float16 / uint8 / uint16 quantisation, ReLU6 and PReLU spelt out, BatchNorm left as Mul + Add),
checked against the independent float64 executor `benchmarks/tfjs_reference.py`.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from benchmarks.tfjs_reference import GraphReference
from erasablemask_jax import convert
from erasablemask_jax import fr
from erasablemask_jax.convert import tfjs
from erasablemask_jax.fr import tfjs_graph
from erasablemask_jax.fr.preprocess import preprocess
from erasablemask_jax.fr.preprocess import uint8_to_minus1_1
from tools.convert_torch_weights.__main__ import main as convert_main


def node(name, op, inputs=(), **attrs):
  out = {"name": name, "op": op, "input": list(inputs)}
  if attrs:
    out["attr"] = {k: tfjs.encode_attr(v) for k, v in attrs.items()}
  return out


def const(name, dtype="DT_FLOAT"):
  return {"name": name, "op": "Const", "attr": {"dtype": {"type": dtype}}}


def placeholder(name="image", h=8, w=8):
  return {"name": name, "op": "Placeholder", "attr": {
      "dtype": {"type": "DT_FLOAT"},
      "shape": {"shape": {"dim": [{"size": "-1"}, {"size": str(h)}, {"size": str(w)}, {"size": "3"}]}}}}


CONV = {"data_format": "NHWC", "dilations": [1, 1, 1, 1]}


def synthetic_graph(rng: np.random.RandomState) -> tuple[list[dict], dict[str, np.ndarray]]:
  """An 8x8 image -> 5-d embedding through every converter idiom the real graphs use, and a few more."""
  w = {
      "c1/k": rng.randn(3, 3, 3, 6) * 0.3, "c1/b": rng.randn(6) * 0.1,
      "c2/k": rng.randn(2, 2, 6, 8) * 0.3,
      "dw/k": rng.randn(3, 3, 8, 1) * 0.3, "dw/b": rng.randn(8) * 0.1, "dw/alpha": rng.rand(8) * 0.3,
      "dw2/k": rng.randn(3, 3, 8, 2) * 0.3, "bn/mul": rng.rand(16) + 0.5, "bn/sub": rng.randn(16) * 0.1,
      "six": np.float32(6.0), "zero": np.float32(0.0), "zero2": np.float32(0.0), "zero3": np.float32(0.0),
      "pw/k": rng.randn(1, 1, 16, 16) * 0.3, "pw/sub": rng.randn(16) * 0.1,
      "prelu/a": rng.rand(16) * 0.25,
      "axes": np.array([1, 2], np.int32),
      "fc/k": rng.randn(16, 12) * 0.3, "fc/b": rng.randn(12) * 0.1,
      "fc2/k": rng.randn(12, 5) * 0.3, "fc2/mul": rng.rand(5) + 0.5, "fc2/add": rng.randn(5) * 0.1,
      "shape": np.array([-1, 5], np.int32),
      "scale/x": np.float32(2.0),
  }
  nodes = [
      placeholder(),
      # stride-2 SAME on an even input: TF pads (0, 1), not (1, 1).
      node("c1", "_FusedConv2D", ["image", "c1/k", "c1/b"], strides=[1, 2, 2, 1], padding="SAME",
           fused_ops=["BiasAdd", "Relu"], num_args=1, epsilon=0.0, **CONV),
      node("c2", "Conv2D", ["c1", "c2/k"], strides=[1, 1, 1, 1], padding="EXPLICIT",
           explicit_paddings=[0, 0, 1, 0, 0, 1, 0, 0], **CONV),
      node("dw", "FusedDepthwiseConv2dNative", ["c2", "dw/k", "dw/b", "dw/alpha"], strides=[1, 1, 1, 1],
           padding="SAME", fused_ops=["BiasAdd", "Prelu"], num_args=2, **CONV),
      node("dw2", "DepthwiseConv2dNative", ["dw", "dw2/k"], strides=[1, 2, 2, 1], padding="SAME", **CONV),
      node("bn/mul_1", "Mul", ["dw2", "bn/mul"]), node("bn/add_1", "Add", ["bn/mul_1", "bn/sub"]),
      node("relu", "Relu", ["bn/add_1"]), node("relu6/min", "Minimum", ["relu", "six"]),
      node("relu6", "Maximum", ["relu6/min", "zero"]),
      node("pw", "Conv2D", ["relu6", "pw/k"], strides=[1, 1, 1, 1], padding="VALID", **CONV),
      node("pw/bn", "Add", ["pw", "pw/sub"]),
      node("prelu/max", "Maximum", ["zero2", "pw/bn"]), node("prelu/min", "Minimum", ["zero3", "pw/bn"]),
      node("prelu/mul", "Mul", ["prelu/a", "prelu/min"]), node("prelu", "AddV2", ["prelu/max", "prelu/mul"]),
      node("pool", "Mean", ["prelu", "axes"], keep_dims=False),
      node("fc", "_FusedMatMul", ["pool", "fc/k", "fc/b"], fused_ops=["BiasAdd", "Relu"], num_args=1,
           transpose_a=False, transpose_b=False),
      node("fc2", "MatMul", ["fc", "fc2/k"], transpose_a=False, transpose_b=False),
      node("fc2/bn/mul", "Mul", ["fc2", "fc2/mul"]), node("fc2/bn", "AddV2", ["fc2/bn/mul", "fc2/add"]),
      node("emb", "Reshape", ["fc2/bn", "shape"]),
      # a second head, as faceres has age and gender heads beside its descriptor
      node("scale/id", "Identity", ["scale/x"]),
      node("head", "Mul", ["fc", "scale/id"]), node("head/out", "Sigmoid", ["head"]),
  ]
  nodes += [const(k, "DT_INT32" if v.dtype == np.int32 else "DT_FLOAT") for k, v in w.items()]
  w = {k: np.asarray(v, np.int32 if np.asarray(v).dtype == np.int32 else np.float32) for k, v in w.items()}
  return nodes, w


@pytest.fixture(name="graph_dir")
def _graph_dir(tmp_path):
  nodes, weights = synthetic_graph(np.random.RandomState(0))
  path = tfjs.write_graph_model(tmp_path / "g", nodes, weights, shards=3,
                                signature={"outputs": {"emb:0": {"name": "emb:0"},
                                                       "head/out:0": {"name": "head/out:0"}}})
  return path, weights


# ----- the reader -----


def test_reader_round_trip_and_quantisation(tmp_path):
  rng = np.random.RandomState(1)
  weights = {"a": rng.randn(3, 4).astype(np.float32), "h": rng.randn(5).astype(np.float32),
             "q8": rng.rand(2, 3).astype(np.float32), "q16": rng.rand(7).astype(np.float32),
             "i": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.float32(3.5)}
  quant = {"h": {"dtype": "float16"}, "q8": {"dtype": "uint8", "scale": 1 / 255, "min": 0.0},
           "q16": {"dtype": "uint16", "scale": 1 / 65535, "min": 0.0}}
  nodes = [const(k, "DT_INT32" if k == "i" else "DT_FLOAT") for k in weights]
  path = tfjs.write_graph_model(tmp_path, nodes, weights, quantization=quant, shards=4)
  g = tfjs.read_graph_model(path)
  np.testing.assert_array_equal(g.weights["a"], weights["a"])
  np.testing.assert_array_equal(g.weights["h"], weights["h"].astype(np.float16).astype(np.float32))
  np.testing.assert_allclose(g.weights["q8"], weights["q8"], atol=0.5 / 255 + 1e-7)
  np.testing.assert_allclose(g.weights["q16"], weights["q16"], atol=0.5 / 65535 + 1e-7)
  assert g.weights["i"].dtype == np.int32 and g.weights["s"].shape == ()
  assert {e.name: e.stored for e in g.entries}["q8"] == "uint8" and len(g.shard_files) == 4


def _refused(path, monkeypatch) -> str:
  """The one-line refusal, raised before any shard is read (reading one fails the test)."""
  def no_read(self, *a, **k):
    raise AssertionError(f"{self} was read before the manifest was checked")
  monkeypatch.setattr(pathlib.Path, "read_bytes", no_read)
  with pytest.raises(convert.CheckpointError) as e:
    tfjs.read_graph_model(path)
  monkeypatch.undo()
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg
  return msg


def _edit_manifest(path, edit):
  model = json.loads(path.read_text())
  edit(model["weightsManifest"][0])
  path.write_text(json.dumps(model))


def test_manifest_refusals_before_reading(graph_dir, monkeypatch, tmp_path):
  path, _ = graph_dir
  good = path.read_text()
  _edit_manifest(path, lambda g: g["paths"].__setitem__(0, "../outside.bin"))
  assert "leaves the model's folder" in _refused(path, monkeypatch)
  path.write_text(good)
  _edit_manifest(path, lambda g: g["paths"].__setitem__(0, "/etc/passwd"))
  assert "absolute" in _refused(path, monkeypatch)
  path.write_text(good)
  (path.parent / "link.bin").symlink_to(tmp_path / "elsewhere.bin")
  _edit_manifest(path, lambda g: g["paths"].__setitem__(0, "link.bin"))
  assert "leaves the model's folder" in _refused(path, monkeypatch)
  path.write_text(good)
  _edit_manifest(path, lambda g: g["weights"][0].__setitem__("shape", [1 << 20, 1 << 20]))
  assert "elements" in _refused(path, monkeypatch)
  path.write_text(good)
  _edit_manifest(path, lambda g: g["weights"][0].__setitem__("shape", [3, -2]))
  assert "negative" in _refused(path, monkeypatch)
  path.write_text(good)
  _edit_manifest(path, lambda g: g["weights"][0].__setitem__("dtype", "string"))
  assert "dtype 'string'" in _refused(path, monkeypatch)
  path.write_text(good)
  _edit_manifest(path, lambda g: g["weights"][0].__setitem__("quantization", {"dtype": "uint4"}))
  assert "quantisation" in _refused(path, monkeypatch)
  path.write_text(good)
  shard = path.parent / json.loads(good)["weightsManifest"][0]["paths"][-1]
  shard.write_bytes(shard.read_bytes()[:-5])
  msg = _refused(path, monkeypatch)
  assert "truncated" in msg and "need" in msg


def test_converter_refusals_are_one_line_and_write_nothing(graph_dir, tmp_path, capsys):
  path, _ = graph_dir
  out = tmp_path / "out"

  def fails(*extra) -> str:
    assert convert_main(["--arch", "tfjs", "--checkpoint", str(path), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err

  err = fails("--preprocess", "rgb:raw")
  assert "2 outputs (emb, head/out)" in err and "--output" in err
  assert "--preprocess" in fails("--output", "emb")
  assert "ORDER:NORM" in fails("--output", "emb", "--preprocess", "rgb:weird")
  assert "no such node" in fails("--output", "nope", "--preprocess", "rgb:raw")
  model = json.loads(path.read_text())
  model["modelTopology"]["node"].append(placeholder("second"))
  model["modelTopology"]["node"].append(node("cs", "Cumsum", ["fc2/bn", "axes"]))
  path.write_text(json.dumps(model))
  err = fails("--output", "emb", "--preprocess", "rgb:raw")
  assert "2 inputs (image, second)" in err and "--input" in err
  assert fails("--output", "cs", "--input", "image", "--preprocess", "rgb:raw").endswith(
      "unsupported op Cumsum (node cs)")
  for n in model["modelTopology"]["node"]:
    if n["name"] == "c2":
      n["attr"]["data_format"] = tfjs.encode_attr("NCHW")
  path.write_text(json.dumps(model))
  assert "data_format NCHW" in fails("--output", "emb", "--input", "image", "--preprocess", "rgb:raw")
  assert not out.exists()
  (tmp_path / "w.pth").write_bytes(b"PK\x03\x04")
  assert convert_main(["--arch", "mobilefacenet", "--checkpoint", str(tmp_path / "w.pth"), "--output", "x",
                       "--out", str(out)]) == 1
  assert "only TF.js graph models" in capsys.readouterr().err


# ----- the interpreter against the reference executor -----


def test_synthetic_graph_matches_reference_and_folds(graph_dir, tmp_path, capsys):
  path, _ = graph_dir
  out = tmp_path / "model"
  assert convert_main(["--arch", "tfjs", "--checkpoint", str(path), "--out", str(out), "--output", "emb:0",
                       "--preprocess", "rgb:unit"]) == 0
  assert "image -> emb" in capsys.readouterr().out
  rec = fr.load(out)
  card = rec.card
  assert card["arch"] == "tfjs" and card["embedding_size"] == 5 and card["input_size"] == [8, 8]
  assert card["source"]["format"] == "tfjs" and len(card["source"]["weights"]) == 3
  ops = card["tfjs"]["ops"]
  # The second head is pruned, Identity(const) folded, ReLU6 and PReLU recognised.
  assert "Sigmoid" not in ops and "Identity" not in ops
  assert ops["Relu6Masked"] == 1 and ops["Prelu"] == 1 and "Minimum" not in ops and "Maximum" not in ops
  x = np.random.RandomState(3).randint(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  want = GraphReference(path).run(x.astype(np.float64) / 255, "emb")
  got = np.asarray(rec.raw_apply_fn(rec.variables, uint8_to_minus1_1(x)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  folded = rec.fold_batchnorm()
  assert len(jax.tree.leaves(folded.variables)) < len(jax.tree.leaves(rec.variables))
  np.testing.assert_allclose(np.asarray(folded.raw_apply_fn(folded.variables, uint8_to_minus1_1(x))),
                             want, rtol=1e-5, atol=1e-5)


def test_fold_affine_rewrites_the_batchnorm_chains(graph_dir):
  path, _ = graph_dir
  program, values = tfjs_graph.build_program(tfjs.read_graph_model(path), output_name="emb")
  folded, folded_values = tfjs_graph.fold_affine(program, values)
  ops = folded.ops()
  # dw2 -> Mul -> Add, pw -> Add and fc2 -> Mul -> AddV2 fold into three fused linear ops with a bias.
  assert "Mul" not in ops and "Add" not in ops and "AddV2" not in ops
  assert ops["FusedDepthwiseConv2dNative"] == 2 and ops["_FusedConv2D"] == 2 and ops["_FusedMatMul"] == 2
  assert folded.output == program.output and len(folded_values) < len(values)
  x = np.random.RandomState(4).rand(2, 8, 8, 3).astype(np.float32)
  np.testing.assert_allclose(tfjs_graph.run_program(folded, folded_values, x),
                             tfjs_graph.run_program(program, values, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,stride,kernel", [(7, 2, 3), (8, 2, 3), (9, 3, 2), (6, 1, 4)])
def test_same_padding_and_depthwise_multiplier_match_the_reference(tmp_path, size, stride, kernel):
  rng = np.random.RandomState(size)
  w = {"k": rng.randn(kernel, kernel, 3, 4).astype(np.float32),
       "d": rng.randn(kernel, kernel, 4, 3).astype(np.float32)}
  nodes = [placeholder("x", size, size), const("k"), const("d"),
           node("c", "Conv2D", ["x", "k"], strides=[1, stride, stride, 1], padding="SAME", **CONV),
           node("y", "DepthwiseConv2dNative", ["c", "d"], strides=[1, stride, stride, 1], padding="SAME", **CONV)]
  path = tfjs.write_graph_model(tmp_path, nodes, w)
  program, values = tfjs_graph.build_program(tfjs.read_graph_model(path))
  x = rng.rand(2, size, size, 3)
  np.testing.assert_allclose(tfjs_graph.run_program(program, values, x.astype(np.float32)),
                             GraphReference(path).run(x, "y"), rtol=1e-5, atol=1e-5)


def test_program_round_trips_through_json(graph_dir):
  path, _ = graph_dir
  program, _ = tfjs_graph.build_program(tfjs.read_graph_model(path), output_name="emb")
  again = tfjs_graph.Program.from_json(json.loads(json.dumps(program.to_json())))
  assert again == program and hash(again) == hash(program)
  data = program.to_json()
  data["version"] = 99
  with pytest.raises(convert.CheckpointError, match="convert the model again"):
    tfjs_graph.Program.from_json(data)


def test_preprocess_vocabulary():
  prep = tfjs_graph.parse_preprocess("bgr:caffe", (224, 224))
  pixels = np.array([[[[10.0, 200.0, 255.0]]]], np.float32)  # RGB
  got = np.asarray(preprocess(pixels / 127.5 - 1, fr.Preprocessing((1, 1), prep.mean, prep.std,
                                                                                   channel_order="BGR")))
  np.testing.assert_allclose(got[0, 0, 0], [255 - 103.939, 200 - 116.779, 10 - 123.68], atol=1e-3)
  raw = tfjs_graph.parse_preprocess("rgb:raw", (112, 112))
  got = np.asarray(preprocess(pixels / 127.5 - 1, fr.Preprocessing((1, 1), raw.mean, raw.std)))
  np.testing.assert_allclose(got[0, 0, 0], [10, 200, 255], atol=1e-3)
