"""An independent float64 numpy executor of TensorFlow.js graph models: the reference the converted models are checked
against (`tests/fr/test_tfjs_models.py`, `benchmarks/real_fr_models.py`).

Written from TensorFlow's op definitions and the TF.js model format, sharing no code with `erasablemask_jax` (neither
its reader `convert.tfjs` nor its interpreter `fr.tfjs_graph`): it reads `model.json` and the shards itself, evaluates
the requested node by recursion over the graph as stored (no pruning, no rewrites, no constant folding, no BatchNorm
folding), in float64, with convolutions written as explicit sums over kernel taps and TF's `SAME` padding computed
here. Only the ops of the graphs it is used on are implemented; any other raises.

    ref = GraphReference("faceres.json")
    emb = ref.run(images_nhwc_float64, "global_pooling/Mean")
"""

from __future__ import annotations

import base64
import json
import pathlib

import numpy as np


def _attr(node: dict, key: str, default=None):
  value = (node.get("attr") or {}).get(key)
  if value is None:
    return default
  if "s" in value:
    return base64.b64decode(value["s"]).decode()
  if "i" in value:
    return int(value["i"])
  if "f" in value:
    return float(value["f"])
  if "b" in value:
    return bool(value["b"])
  if "list" in value:
    lst = value["list"]
    if "s" in lst:
      return [base64.b64decode(s).decode() for s in lst["s"]]
    if "i" in lst:
      return [int(i) for i in lst["i"]]
    if "f" in lst:
      return [float(f) for f in lst["f"]]
    return []
  return default


def read_weights(model_json: pathlib.Path) -> dict[str, np.ndarray]:
  """Every manifest entry as a float64 (or int64) array: groups' shards concatenated, entries in order."""
  model = json.loads(model_json.read_text())
  out = {}
  for group in model["weightsManifest"]:
    data = b"".join((model_json.parent / p).read_bytes() for p in group["paths"])
    pos = 0
    for w in group["weights"]:
      count = int(np.prod(w["shape"])) if w["shape"] else 1
      q = w.get("quantization")
      if q is None:
        stored = {"float32": "<f4", "int32": "<i4"}[w["dtype"]]
      else:
        stored = {"float16": "<f2", "uint8": "u1", "uint16": "<u2"}[q["dtype"]]
      nbytes = count * np.dtype(stored).itemsize
      values = np.frombuffer(data[pos:pos + nbytes], dtype=stored).astype(np.float64)
      pos += nbytes
      if q is not None and q["dtype"] in ("uint8", "uint16"):
        values = values * q["scale"] + q["min"]
      if w["dtype"] == "int32":
        values = np.round(values).astype(np.int64)
      out[w["name"]] = values.reshape(w["shape"])
  return out


def _same(size: int, k: int, s: int) -> tuple[int, int]:
  out = (size + s - 1) // s
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _padding(node: dict, h: int, w: int, kh: int, kw: int, sh: int, sw: int):
  mode = _attr(node, "padding", "VALID")
  if mode == "VALID":
    return (0, 0), (0, 0)
  if mode == "SAME":
    return _same(h, kh, sh), _same(w, kw, sw)
  p = _attr(node, "explicit_paddings")
  return (p[2], p[3]), (p[4], p[5])


def conv(node: dict, x: np.ndarray, k: np.ndarray, depthwise: bool) -> np.ndarray:
  """NHWC convolution as a sum over taps: `y[n,i,j,o] = sum_{a,b,c} xp[n, s*i+a, s*j+b, c] * k[a, b, c, o]`
  (depthwise: `k (kh, kw, C, m)`, output channel `c*m + j` sees input channel c only)."""
  _, sh, sw, _ = _attr(node, "strides", [1, 1, 1, 1])
  if any(d != 1 for d in _attr(node, "dilations", [1, 1, 1, 1])):
    raise NotImplementedError(f"dilated convolution ({node['name']})")
  n, h, w, c = x.shape
  kh, kw = k.shape[:2]
  (pt, pb), (pl, pr) = _padding(node, h, w, kh, kw, sh, sw)
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  outc = k.shape[2] * k.shape[3] if depthwise else k.shape[3]
  y = np.zeros((n, ho, wo, outc))
  for a in range(kh):
    for b in range(kw):
      patch = xp[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw, :]
      if depthwise:
        y += (patch[..., :, None] * k[a, b]).reshape(n, ho, wo, outc)
      else:
        y += (np.ascontiguousarray(patch).reshape(-1, c) @ k[a, b]).reshape(n, ho, wo, outc)
  return y


def _fused(node: dict, y: np.ndarray, args: list) -> np.ndarray:
  ops = _attr(node, "fused_ops", [])
  i = 0
  for op in ops:
    if op in ("BiasAdd", "Add"):
      y = y + args[i]
      i += 1
    elif op == "Prelu":
      y = np.where(y > 0, y, args[i] * y)
      i += 1
    elif op == "Relu":
      y = np.maximum(y, 0)
    elif op == "Relu6":
      y = np.clip(y, 0, 6)
    elif op == "LeakyRelu":
      alpha = _attr(node, "leakyrelu_alpha", 0.2)
      y = np.where(y > 0, y, alpha * y)
    elif op == "Elu":
      y = np.where(y > 0, y, np.expm1(np.minimum(y, 0)))
    elif op == "Sigmoid":
      y = 1 / (1 + np.exp(-y))
    else:
      raise NotImplementedError(f"fused op {op} ({node['name']})")
  return y


class GraphReference:
  """Runs a TF.js graph model in float64 numpy; `run(x, output)` evaluates one node for an NHWC batch."""

  def __init__(self, model_json: str | pathlib.Path):
    self.path = pathlib.Path(model_json)
    model = json.loads(self.path.read_text())
    self.nodes = {n["name"]: n for n in model["modelTopology"]["node"]}
    self.weights = read_weights(self.path)

  def run(self, x: np.ndarray, output: str, input_name: str | None = None) -> np.ndarray:
    if input_name is None:
      input_name = next(n for n, v in self.nodes.items() if v["op"] == "Placeholder")
    values = {input_name: np.asarray(x, np.float64)}
    return self._eval(output.split(":")[0], values)

  def _eval(self, name: str, values: dict) -> np.ndarray:
    stack = [name]
    while stack:  # iterative post-order: graphs are deeper than Python's recursion limit likes
      top = stack[-1]
      if top in values:
        stack.pop()
        continue
      node = self.nodes[top]
      deps = [i.split(":")[0] for i in node.get("input", []) if not i.startswith("^")]
      todo = [d for d in deps if d not in values]
      if todo:
        stack.extend(todo)
        continue
      values[top] = self._op(node, [values[d] for d in deps])
      stack.pop()
    return values[name]

  def _op(self, node: dict, ins: list) -> np.ndarray:
    op = node["op"]
    if op == "Const":
      return self.weights[node["name"]]
    if op in ("Conv2D", "_FusedConv2D"):
      return _fused(node, conv(node, ins[0], ins[1], False), ins[2:]) if op[0] == "_" else conv(node, *ins, False)
    if op in ("DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"):
      y = conv(node, ins[0], ins[1], True)
      return _fused(node, y, ins[2:]) if op.startswith("Fused") else y
    if op in ("MatMul", "_FusedMatMul"):
      a, b = ins[0], ins[1]
      if _attr(node, "transpose_a", False):
        a = a.T
      if _attr(node, "transpose_b", False):
        b = b.T
      return _fused(node, a @ b, ins[2:]) if op[0] == "_" else a @ b
    if op in ("Add", "AddV2", "BiasAdd"):
      return ins[0] + ins[1]
    if op == "Sub":
      return ins[0] - ins[1]
    if op == "Mul":
      return ins[0] * ins[1]
    if op == "Maximum":
      return np.maximum(ins[0], ins[1])
    if op == "Minimum":
      return np.minimum(ins[0], ins[1])
    if op == "Relu":
      return np.maximum(ins[0], 0)
    if op == "Relu6":
      return np.clip(ins[0], 0, 6)
    if op == "Prelu":
      return np.where(ins[0] > 0, ins[0], ins[1] * ins[0])
    if op == "Sigmoid":
      return 1 / (1 + np.exp(-ins[0]))
    if op == "Softmax":
      e = np.exp(ins[0] - ins[0].max(axis=-1, keepdims=True))
      return e / e.sum(axis=-1, keepdims=True)
    if op == "Mean":
      return ins[0].mean(axis=tuple(int(a) for a in np.atleast_1d(ins[1])), keepdims=_attr(node, "keep_dims", False))
    if op == "Pad":
      return np.pad(ins[0], [(int(a), int(b)) for a, b in np.asarray(ins[1]).reshape(-1, 2)])
    if op == "Reshape":
      return ins[0].reshape([int(s) for s in np.atleast_1d(ins[1])])
    if op == "Identity":
      return ins[0]
    raise NotImplementedError(f"op {op} ({node['name']})")
