"""MXNet checkpoints with numpy alone: the `.params` NDArray list, the `-symbol.json` graph, and the rename table.

`PREFIX-EPOCH.params` (what `mx.model.save_checkpoint` writes), little-endian:

    uint64 0x112 (list magic), uint64 reserved, uint64 count, then `count` arrays, each one of
      v2     uint32 0xF993FAC9, int32 storage type (0 = dense), uint32 ndim, int64 dims[ndim], ...
      v1     uint32 0xF993FAC8, uint32 ndim, int64 dims[ndim], ...
      legacy uint32 ndim (the first word is not a magic), uint32 dims[ndim], ...
    and then (unless ndim == 0, an empty array) int32 dev_type, int32 dev_id, int32 type flag, the raw C-order data;
    after the arrays uint64 count of names and per name uint64 length + bytes (`arg:NAME` / `aux:NAME`).

`PREFIX-symbol.json` is the graph: `nodes` (op, name, attrs, inputs as `[node, output, version]`), `arg_nodes`,
`heads`. Parameters are the `null` nodes other than the data input; a BatchNorm's moving mean / variance inputs are
auxiliary states (`aux:`), every other parameter an argument (`arg:`).

Rename (`mxnet_to_flax_flat`), with Flax module names equal to the MXNet layer names:

    arg:X_weight (4-D, OIHW)   -> params/X/kernel (HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, 1, C))
    arg:X_weight (2-D)         -> params/X/kernel (transposed; after an NCHW Flatten its rows are permuted)
    arg:X_bias                 -> params/X/bias
    arg:X_gamma / arg:X_beta   -> params/X/scale / params/X/bias
    aux:X_moving_mean / _var   -> batch_stats/X/mean / batch_stats/X/var
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from erasablemask_jax.convert.layout import UNMAPPED
from erasablemask_jax.convert.layout import conv_oihw_to_hwio
from erasablemask_jax.convert.layout import linear_after_nchw_flatten
from erasablemask_jax.convert.layout import linear_to_dense
from erasablemask_jax.convert.state_dict import CheckpointError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
# mshadow type flags; 7 (bool) and above are not written by the MXNet 1.x model zoo.
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}
STORAGE_NAMES = {1: "row_sparse", 2: "csr"}
_MAX_NDIM = 32
# BatchNorm defaults of the MXNet symbol API (not Gluon's, not PyTorch's).
BN_DEFAULT_EPS = 1e-3


def is_params_file(path: str | os.PathLike[str]) -> bool:
  """True for a `.params` file or any file that starts with the NDArray-list header."""
  path = pathlib.Path(path)
  if path.suffix == ".params":
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return False
  return len(head) == 8 and int.from_bytes(head, "little") == LIST_MAGIC


class _Reader:
  """Little-endian reads from bytes, raising `CheckpointError` naming the file when they run past the end."""

  def __init__(self, data: bytes, path: pathlib.Path):
    self.data, self.path, self.pos = data, path, 0

  def fail(self, what: str) -> CheckpointError:
    return CheckpointError(f"{self.path}: not a valid MXNet .params file: {what} (at byte {self.pos} of "
                           f"{len(self.data)}); download it again and check its sha256")

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or self.pos + n > len(self.data):
      raise self.fail(f"truncated while reading {what}: {n} bytes needed, {len(self.data) - self.pos} left")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def ints(self, dtype: str, count: int, what: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.frombuffer(self.take(size * count, what), dtype=dtype, count=count)

  def int(self, dtype: str, what: str) -> int:
    return int(self.ints(dtype, 1, what)[0])


def _read_shape(r: _Reader, dim_dtype: str, ndim: int | None, what: str) -> tuple[int, ...]:
  if ndim is None:
    ndim = r.int("<u4", f"{what} ndim")
  if ndim > _MAX_NDIM:
    raise r.fail(f"{what} has {ndim} dimensions")
  dims = tuple(int(d) for d in r.ints(dim_dtype, ndim, f"{what} shape"))
  if any(d < 0 for d in dims):
    raise r.fail(f"{what} has negative dimensions {dims}")
  return dims


def _read_array(r: _Reader, index: int) -> np.ndarray:
  what = f"array {index}"
  magic = r.int("<u4", f"{what} magic")
  if magic == V2_MAGIC:
    stype = r.int("<i4", f"{what} storage type")
    if stype != 0:
      raise CheckpointError(
          f"{r.path}: array {index} has {STORAGE_NAMES.get(stype, f'storage type {stype}')} storage; only dense "
          "arrays are supported: convert it to dense (`.tostype('default')`) and save again")
    shape = _read_shape(r, "<i8", None, what)
  elif magic == V1_MAGIC:
    shape = _read_shape(r, "<i8", None, what)
  elif magic == V3_MAGIC:
    raise CheckpointError(f"{r.path}: array {index} is in the NDArray v3 (numpy-shape) format, which is not "
                          "supported; save it with MXNet's legacy (non-numpy) shape semantics")
  elif magic <= _MAX_NDIM:  # legacy: the first word is ndim, dims are uint32
    shape = _read_shape(r, "<u4", magic, what)
  else:
    raise r.fail(f"{what} starts with {magic:#010x}, not an NDArray magic (0xf993fac9 / 0xf993fac8) or a legacy ndim")
  if not shape:  # an empty (none) NDArray: nothing follows
    return np.zeros((0,), np.float32)
  r.int("<i4", f"{what} dev_type")
  r.int("<i4", f"{what} dev_id")
  flag = r.int("<i4", f"{what} type flag")
  if flag not in DTYPES:
    raise CheckpointError(f"{r.path}: array {index} has type flag {flag}, which is not supported (supported: "
                          + ", ".join(f"{k} {np.dtype(v).name}" for k, v in DTYPES.items())
                          + "); cast it to float32 and save again")
  dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
  count = int(np.prod(shape, dtype=np.int64))
  data = r.take(count * dtype.itemsize, f"{what} data ({shape}, {dtype.name})")
  return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_ndarray_list(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads an MXNet NDArray-list file (`nd.save`, `.params`) into `{name: array}` in file order.

  Args:
    path: the file.

  Returns:
    `{"arg:conv1_weight": array, "aux:bn1_moving_mean": array, ...}`; a file saved from a list (no names) is keyed
    `"0", "1", ...`. Empty (none) arrays come back as float32 arrays of shape `(0,)`.

  Raises:
    FileNotFoundError: the file does not exist.
    CheckpointError: a one-line message naming the file and the problem (bad magic, truncation, sparse storage,
      unsupported dtype, names that do not match the arrays).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  r = _Reader(path.read_bytes(), path)
  if len(r.data) < 8:
    raise r.fail(f"{len(r.data)} bytes, shorter than the header")
  header = r.int("<u8", "header")
  if header != LIST_MAGIC:
    raise CheckpointError(f"{path}: not an MXNet NDArray file (header {header:#x}, expected {LIST_MAGIC:#x}); "
                          "is it a checkpoint of another framework?")
  r.int("<u8", "reserved")
  count = r.int("<u8", "array count")
  if count > len(r.data):
    raise r.fail(f"array count {count} exceeds the file size")
  arrays = [_read_array(r, i) for i in range(count)]
  n_names = r.int("<u8", "name count")
  if n_names not in (0, count):
    raise r.fail(f"{n_names} names for {count} arrays")
  names = []
  for i in range(n_names):
    length = r.int("<u8", f"name {i} length")
    try:
      names.append(r.take(length, f"name {i}").decode("utf-8"))
    except UnicodeDecodeError as e:
      raise r.fail(f"name {i} is not UTF-8") from e
  if r.pos != len(r.data):
    raise r.fail(f"{len(r.data) - r.pos} trailing bytes after the names")
  names = names or [str(i) for i in range(count)]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise CheckpointError(f"{path}: duplicate array names {dup[:5]}")
  return dict(zip(names, arrays))


# ----- the symbol graph -----


@dataclasses.dataclass(frozen=True)
class Node:
  """One node of a symbol graph: `op` (`null` for variables), `name`, string `attrs`, input node indices."""
  op: str
  name: str
  attrs: Mapping[str, str]
  inputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SymbolGraph:
  """A parsed `-symbol.json`: nodes in topological order and the head (output) node indices."""
  nodes: tuple[Node, ...]
  heads: tuple[int, ...]
  path: pathlib.Path | None = None

  def ops(self) -> dict[str, int]:
    """`{op: count}` of the operator nodes (variables excluded)."""
    out: dict[str, int] = {}
    for n in self.nodes:
      if n.op != "null":
        out[n.op] = out.get(n.op, 0) + 1
    return out

  def aux_names(self) -> set[str]:
    """Variables that are auxiliary states: the moving mean / variance inputs of each BatchNorm."""
    return {self.nodes[i].name for n in self.nodes if n.op == "BatchNorm" for i in n.inputs[3:5]}

  def param_keys(self, data_names: Iterable[str] = ("data",)) -> list[str]:
    """`arg:NAME` / `aux:NAME` of every variable except the data inputs, in graph order."""
    aux, data_names = self.aux_names(), set(data_names)
    return [f"{'aux' if n.name in aux else 'arg'}:{n.name}" for n in self.nodes
            if n.op == "null" and n.name not in data_names]


def read_symbol(path: str | os.PathLike[str]) -> SymbolGraph:
  """Parses an MXNet `-symbol.json` (attributes under `attrs`, or `attr` / `param` in older files)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"symbol file {path} does not exist")
  try:
    raw = json.loads(path.read_text())
    nodes = tuple(Node(op=str(n["op"]), name=str(n["name"]),
                       attrs={str(k): str(v) for k, v in (n.get("attrs") or n.get("attr") or n.get("param")
                                                          or {}).items()},
                       inputs=tuple(int(i[0]) for i in n.get("inputs", [])))
                  for n in raw["nodes"])
    heads = tuple(int(h[0]) for h in raw["heads"])
  except (ValueError, KeyError, TypeError, IndexError) as e:
    raise CheckpointError(f"{path}: not an MXNet symbol graph ({type(e).__name__}: {e})") from e
  for i, n in enumerate(nodes):
    if any(j >= i or j < 0 for j in n.inputs):
      raise CheckpointError(f"{path}: node {i} ({n.name}) has inputs {n.inputs} that are not earlier nodes")
  return SymbolGraph(nodes, heads, path)


def symbol_path_for(params_path: str | os.PathLike[str]) -> pathlib.Path | None:
  """MXNet naming: `PREFIX-0000.params` -> `PREFIX-symbol.json` when that file exists, else `None`."""
  params_path = pathlib.Path(params_path)
  m = re.fullmatch(r"(.*)-\d+", params_path.stem)
  if not m:
    return None
  candidate = params_path.with_name(f"{m.group(1)}-symbol.json")
  return candidate if candidate.is_file() else None


def parse_attr(value: str) -> Any:
  """`"(3, 3)"` -> `(3, 3)`, `"True"` -> `True`, `"0.001"` -> `0.001`, `"relu"` -> `"relu"`."""
  try:
    out = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value
  return tuple(out) if isinstance(out, list) else out


def _pair(v: Any) -> tuple[int, ...]:
  return tuple(int(x) for x in v) if isinstance(v, tuple) else (int(v),)


# Computation attributes of each layer op, with the MXNet symbol API's defaults filled in.
LAYER_DEFAULTS = {
    "Convolution": {"stride": (1, 1), "pad": (0, 0), "dilate": (1, 1), "num_group": 1, "no_bias": False},
    "BatchNorm": {"eps": BN_DEFAULT_EPS, "fix_gamma": True, "axis": 1},
    "FullyConnected": {"no_bias": False, "flatten": True},
}
_LAYER_KEYS = {
    "Convolution": ("kernel", "num_filter", "stride", "pad", "dilate", "num_group", "no_bias"),
    "BatchNorm": ("eps", "fix_gamma", "axis"),
    "FullyConnected": ("num_hidden", "no_bias", "flatten"),
}


def layer_attrs(node: Node) -> dict[str, Any]:
  """The parsed computation attributes of a Convolution / BatchNorm / FullyConnected node, defaults filled in."""
  attrs = dict(LAYER_DEFAULTS[node.op])
  attrs.update({k: parse_attr(v) for k, v in node.attrs.items() if k in _LAYER_KEYS[node.op]})
  return {k: attrs[k] for k in _LAYER_KEYS[node.op] if k in attrs}


def graph_layers(graph: SymbolGraph) -> dict[str, dict[str, Any]]:
  """`{layer name: {"op": op, **layer_attrs}}` of every Convolution / BatchNorm / FullyConnected node."""
  return {n.name: {"op": n.op, **layer_attrs(n)} for n in graph.nodes if n.op in LAYER_DEFAULTS}


_SCALAR_OPS = ("_minus_scalar", "_plus_scalar", "_mul_scalar", "_div_scalar", "_maximum_scalar", "_minimum_scalar",
               "_rminus_scalar", "_rdiv_scalar")
_SAME_SHAPE_OPS = _SCALAR_OPS + ("Activation", "Dropout", "_copy", "identity", "relu", "sigmoid", "clip")
_ADD_OPS = ("elemwise_add", "_Plus", "_plus", "elemwise_sub", "elemwise_mul", "_Minus", "_Mul")


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
  return (size + 2 * p - d * (k - 1) - 1) // s + 1


def infer_param_shapes(graph: SymbolGraph, data_shape: Sequence[int],
                       data_name: str = "data") -> dict[str, tuple[int, ...]]:
  """Shapes of the graph's parameters for an input of `data_shape` (NCHW), keyed `arg:NAME` / `aux:NAME`.

  Covers the ops of the convolutional face-recognition graphs: Convolution (grouped included), BatchNorm,
  FullyConnected, Flatten, Pooling, Activation / LeakyReLU (PReLU), Dropout, scalar arithmetic and element-wise
  addition. Any other op raises `CheckpointError` naming it.
  """
  where = graph.path or "symbol"
  shapes: dict[int, tuple[int, ...]] = {}
  params: dict[str, tuple[int, ...]] = {}

  def setp(index: int, shape: tuple[int, ...]) -> None:
    node = graph.nodes[index]
    if node.op != "null":
      raise CheckpointError(f"{where}: node {node.name} is used as a parameter but is a {node.op}")
    params[node.name] = shape
    shapes[index] = shape

  for i, n in enumerate(graph.nodes):
    ins = [shapes.get(j) for j in n.inputs]
    if n.op == "null":
      if n.name == data_name:
        shapes[i] = tuple(int(d) for d in data_shape)
      continue
    x = ins[0] if ins else None
    if x is None:
      raise CheckpointError(f"{where}: cannot infer the input shape of {n.op} {n.name}")
    if n.op == "Convolution":
      a = layer_attrs(n)
      k, s, p, d = _pair(a["kernel"]), _pair(a["stride"]), _pair(a["pad"]), _pair(a["dilate"])
      if len(k) != 2 or len(x) != 4:
        raise CheckpointError(f"{where}: only 2-D convolutions are supported ({n.name}: kernel {k}, input {x})")
      c_out, groups = int(a["num_filter"]), int(a["num_group"])
      if x[1] % groups or c_out % groups:
        raise CheckpointError(f"{where}: {n.name}: {x[1]} input / {c_out} output channels do not divide into "
                              f"{groups} groups")
      setp(n.inputs[1], (c_out, x[1] // groups, *k))
      if not a["no_bias"]:
        setp(n.inputs[2], (c_out,))
      shapes[i] = (x[0], c_out, *(_conv_out(x[2 + j], k[j], s[j], p[j], d[j]) for j in range(2)))
    elif n.op == "BatchNorm":
      c = x[int(layer_attrs(n)["axis"]) % len(x)]
      for j in n.inputs[1:5]:
        setp(j, (c,))
      shapes[i] = x
    elif n.op == "FullyConnected":
      a = layer_attrs(n)
      if not a["flatten"]:
        raise CheckpointError(f"{where}: FullyConnected {n.name} with flatten=False is not supported")
      hidden, fan_in = int(a["num_hidden"]), int(np.prod(x[1:]))
      setp(n.inputs[1], (hidden, fan_in))
      if not a["no_bias"]:
        setp(n.inputs[2], (hidden,))
      shapes[i] = (x[0], hidden)
    elif n.op == "Flatten":
      shapes[i] = (x[0], int(np.prod(x[1:])))
    elif n.op == "LeakyReLU":
      if parse_attr(n.attrs.get("act_type", "leaky")) == "prelu":
        setp(n.inputs[1], (x[1],))
      shapes[i] = x
    elif n.op == "Pooling":
      a = {k: parse_attr(v) for k, v in n.attrs.items()}
      if a.get("global_pool", False):
        shapes[i] = (x[0], x[1], 1, 1)
      else:
        k, s, p = _pair(a["kernel"]), _pair(a.get("stride", (1, 1))), _pair(a.get("pad", (0, 0)))
        shapes[i] = (x[0], x[1], *(_conv_out(x[2 + j], k[j], s[j], p[j], 1) for j in range(2)))
    elif n.op in _SAME_SHAPE_OPS:
      shapes[i] = x
    elif n.op in _ADD_OPS:
      if len(set(ins)) != 1:
        raise CheckpointError(f"{where}: {n.op} {n.name} adds different shapes {ins}")
      shapes[i] = x
    else:
      raise CheckpointError(f"{where}: op {n.op} ({n.name}) is not supported by the graph check")
  aux = graph.aux_names()
  return {f"{'aux' if name in aux else 'arg'}:{name}": shape for name, shape in params.items()}


def _summary(title: str, keys: Sequence[str], limit: int) -> str:
  shown = ", ".join(keys[:limit])
  return f"{len(keys)} {title} ({shown}{', ...' if len(keys) > limit else ''})"


def check_params_match_symbol(params: Mapping[str, np.ndarray], graph: SymbolGraph, data_shape: Sequence[int],
                              context: str = "", limit: int = 5) -> None:
  """Raises `CheckpointError` unless `params` holds exactly the graph's parameters at the inferred shapes.

  The message gives the counts and the first `limit` keys of each kind of problem.
  """
  want = infer_param_shapes(graph, data_shape)
  missing = [k for k in want if k not in params]
  unexpected = [k for k in params if k not in want]
  mismatched = [f"{k} {tuple(params[k].shape)} vs graph {want[k]}" for k in want
                if k in params and tuple(params[k].shape) != want[k]]
  if missing or unexpected or mismatched:
    parts = [_summary(t, keys, limit) for t, keys in (("in the graph but not the params", missing),
                                                       ("in the params but not the graph", unexpected),
                                                       ("mis-shaped", mismatched)) if keys]
    raise CheckpointError(f"{context or 'params'} and symbol {graph.path} do not match: " + "; ".join(parts)
                          + ". Are they from the same model (same PREFIX)?")


def check_layers(graph: SymbolGraph, expected: Mapping[str, Mapping[str, Any]], context: str = "",
                 limit: int = 5) -> None:
  """Raises `CheckpointError` unless the graph's layers (name, op, computation attrs) equal `expected`.

  Args:
    graph: the parsed symbol.
    expected: `{layer name: {"op": ..., attr: value}}` as `graph_layers` returns them for the architecture.
    context: words for the message (architecture, file).
    limit: at most this many keys listed per kind of problem.
  """
  got = graph_layers(graph)
  missing = [k for k in expected if k not in got]
  unexpected = [k for k in got if k not in expected]
  differ = []
  for name in expected:
    if name in got:
      diff = {k: (got[name].get(k), v) for k, v in expected[name].items() if got[name].get(k) != v}
      if diff:
        differ.append(f"{name} " + ", ".join(f"{k}={g!r} (architecture {w!r})" for k, (g, w) in diff.items()))
  if missing or unexpected or differ:
    parts = [_summary(t, keys, limit) for t, keys in (("layers of the architecture not in the graph", missing),
                                                       ("layers of the graph not in the architecture", unexpected),
                                                       ("layers with other attributes", differ)) if keys]
    raise CheckpointError(f"symbol {graph.path} is not this architecture{(' (' + context + ')') if context else ''}: "
                          + "; ".join(parts) + ". Is the checkpoint for a different --arch?")


# ----- rename -----

_SUFFIXES = (("arg", "_weight", "params/{}/kernel"), ("arg", "_bias", "params/{}/bias"),
             ("arg", "_gamma", "params/{}/scale"), ("arg", "_beta", "params/{}/bias"),
             ("aux", "_moving_mean", "batch_stats/{}/mean"), ("aux", "_moving_var", "batch_stats/{}/var"))


def _rename_one(key: str, value: np.ndarray,
                nchw_flatten: Mapping[str, tuple[int, int, int]]) -> tuple[str, np.ndarray] | None:
  kind, _, name = key.partition(":")
  for want_kind, suffix, dst in _SUFFIXES:
    if kind != want_kind or not name.endswith(suffix) or len(name) == len(suffix):
      continue
    layer = name[:-len(suffix)]
    if suffix == "_weight" and value.ndim == 4:
      return dst.format(layer), conv_oihw_to_hwio(value)
    if suffix == "_weight" and value.ndim == 2:
      chw = nchw_flatten.get(layer)
      if chw is not None and value.shape[1] == int(np.prod(chw)):
        return dst.format(layer), linear_after_nchw_flatten(value, chw)
      return dst.format(layer), linear_to_dense(value)
    return (dst.format(layer), value) if suffix != "_weight" and value.ndim == 1 else None
  return None


def mxnet_to_flax_flat(params: Mapping[str, np.ndarray],
                       nchw_flatten: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, np.ndarray]:
  """`{"arg:conv1_weight": ...}` -> `{"params/conv1/kernel": ...}` by the suffix table in the module docstring.

  Args:
    params: the `.params` arrays.
    nchw_flatten: `{layer: (C, H, W)}` for FullyConnected layers that follow a Flatten of an NCHW map: their kernel
      rows are permuted to the NHWC flatten order (`linear_after_nchw_flatten`).

  Returns:
    Flat Flax variables; keys that fit no rule (or have the wrong rank for it) come back under `unmapped/<key>` so
    that `strict_merge` reports them as unexpected.
  """
  flat: dict[str, np.ndarray] = {}
  for key, value in params.items():
    renamed = _rename_one(key, np.asarray(value), nchw_flatten or {})
    if renamed is None or renamed[0] in flat:
      flat[f"{UNMAPPED}/{key}"] = np.asarray(value)
    else:
      flat[renamed[0]] = renamed[1]
  return flat
