"""MXNet's `-symbol.json` graph: reading it, inferring its parameters' shapes, and checking a checkpoint against it.

`PREFIX-symbol.json` holds `nodes` (op, name, attrs, inputs as `[node, output, version]`), `arg_nodes` and `heads`.
Parameters are the `null` nodes other than the data input; a BatchNorm's moving mean / variance inputs are auxiliary
states (`aux:`), every other parameter an argument (`arg:`). `check_params_match_symbol` compares a `.params` file's
arrays with the shapes the graph implies; `check_layers` compares the graph's layers with an architecture's.
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

from erasablemask_jax.convert.state_dict import CheckpointError

# BatchNorm defaults of the MXNet symbol API (not Gluon's, not PyTorch's).
BN_DEFAULT_EPS = 1e-3


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
