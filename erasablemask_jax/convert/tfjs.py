"""TensorFlow.js graph models with numpy alone: `model.json` (the graph and its weights manifest) and the `.bin` shards.

A TF.js graph model (`"format": "graph-model"`, what `tensorflowjs_converter` writes from a SavedModel or frozen
graph) is

    model.json   {"modelTopology": {"node": [NodeDef, ...], "library": {...}, "versions": {...}},
                  "weightsManifest": [{"paths": ["group1-shard1of2.bin", ...], "weights": [entry, ...]}, ...],
                  "signature": {"inputs": {...}, "outputs": {...}}, "format", "generatedBy", "convertedBy"}
    *.bin        per group, its shards concatenated are the group's weights, one after the other in manifest order,
                 little-endian, C order.

A NodeDef is TensorFlow's protobuf in JSON: `name`, `op`, `input` (`"node"`, `"node:1"` for a second output,
`"^node"` for a control edge) and `attr`, whose values are AttrValue messages (`{"s": base64}`, `{"i": "3"}` (int64 as a
string), `{"f": 0.5}`, `{"b": true}`, `{"type": "DT_FLOAT"}`, `{"shape": ...}`, `{"list": {"i": [...], "s": [...]}}`).
`decode_attr` turns each into plain Python. Every `Const` node's value is a manifest entry of the same name.

A manifest entry is `{"name", "shape", "dtype"}` and, when the converter quantised it, `"quantization"`:

    {"dtype": "float16", "original_dtype": "float32"}           stored as IEEE half floats
    {"dtype": "uint8" | "uint16", "scale": s, "min": m, ...}    stored as integers q, value = q * s + m (affine)

Everything is checked before a byte of the shards is read (`check_manifest`): every shard path stays inside the
model's folder, every shape is a list of non-negative integers whose size stays under `MAX_ELEMENTS` per tensor and
`MAX_TOTAL_BYTES` in all, every dtype is one we can lay out, and each group's shards hold at least the bytes its
entries need. `read_graph_model` returns a `GraphModel`: the decoded nodes and the weights as float32 / int32 arrays.
Executing the graph is `erasablemask_jax.fr.tfjs_graph`'s business.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from erasablemask_jax.convert.state_dict import CheckpointError

# A face-recognition network has a few million parameters; these limits only stop a damaged or hostile manifest
# from allocating memory it has no business asking for (a shape of [1e12]).
MAX_ELEMENTS = 1 << 28          # per tensor (1 GiB of float32)
MAX_TOTAL_BYTES = 4 << 30       # all weights, after dequantisation to float32
MAX_RANK = 8
MAX_JSON_BYTES = 256 << 20
# Manifest dtypes (what a weight is) and the storage dtypes of quantisation; bytes per element, numpy type.
DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
QUANTISED = {"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16, "int8": np.int8}
TF_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_BOOL": "bool", "DT_HALF": "float16",
             "DT_INT64": "int64", "DT_STRING": "string"}


def is_graph_model(path: str | os.PathLike[str]) -> bool:
  """True for a `.json` file that looks like a TF.js model (`modelTopology` or `weightsManifest` near its start)."""
  path = pathlib.Path(path)
  if path.suffix.lower() != ".json":
    return False
  try:
    with open(path, "rb") as f:
      head = f.read(1 << 16)
  except OSError:
    return False
  return b'"modelTopology"' in head or b'"weightsManifest"' in head or b'"graph-model"' in head


def decode_attr(value: Any) -> Any:
  """One TensorFlow AttrValue (JSON) -> Python: str, int, float, bool, dtype name, list, shape list or a raw dict."""
  if not isinstance(value, Mapping):
    return value
  if "s" in value:
    return base64.b64decode(value["s"]).decode("utf-8", errors="replace")
  if "i" in value:
    return int(value["i"])
  if "f" in value:
    return float(value["f"])
  if "b" in value:
    return bool(value["b"])
  if "type" in value:
    return TF_DTYPES.get(value["type"], value["type"])
  if "shape" in value:
    shape = value["shape"]
    if shape.get("unknownRank"):
      return None
    return [int(d.get("size", -1)) for d in shape.get("dim", [])]
  if "list" in value:
    lst = value["list"]
    if "s" in lst:
      return [base64.b64decode(s).decode("utf-8", errors="replace") for s in lst["s"]]
    if "i" in lst:
      return [int(i) for i in lst["i"]]
    if "f" in lst:
      return [float(f) for f in lst["f"]]
    if "b" in lst:
      return [bool(b) for b in lst["b"]]
    if "type" in lst:
      return [TF_DTYPES.get(t, t) for t in lst["type"]]
    return []
  return dict(value)


@dataclasses.dataclass(frozen=True)
class TFNode:
  """A graph node: `op`, `name`, data inputs (`"node"` or `"node:k"`; control edges dropped) and decoded attrs."""
  name: str
  op: str
  inputs: tuple[str, ...]
  attrs: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  """One weight of the manifest, checked: where it lies in its group and how to decode it."""
  name: str
  shape: tuple[int, ...]
  dtype: str            # what the weight is (float32, int32, bool)
  stored: str           # how it is stored (the dtype, or the quantisation dtype)
  group: int
  offset: int           # byte offset in the group's concatenated shards
  nbytes: int
  scale: float | None = None
  minimum: float | None = None

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class GraphModel:
  """A read TF.js graph model: decoded nodes in file order, weights by name, signature and provenance."""
  path: pathlib.Path
  nodes: tuple[TFNode, ...]
  weights: Mapping[str, np.ndarray]
  entries: tuple[ManifestEntry, ...]
  signature: Mapping[str, Any]
  meta: Mapping[str, Any]          # format, generatedBy, convertedBy
  shard_files: tuple[pathlib.Path, ...]

  def ops(self) -> dict[str, int]:
    """`{op: count}` of every node, constants and placeholders included."""
    out: dict[str, int] = {}
    for n in self.nodes:
      out[n.op] = out.get(n.op, 0) + 1
    return out


def _fail(path: pathlib.Path, what: str) -> CheckpointError:
  return CheckpointError(f"{path}: {what}")


def read_model_json(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The parsed `model.json`, checked to be a TF.js graph model (not a layers model, not another JSON)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  size = path.stat().st_size
  if size > MAX_JSON_BYTES:
    raise _fail(path, f"refused: {size} bytes is not a TF.js model.json (over {MAX_JSON_BYTES >> 20} MiB)")
  try:
    model = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise _fail(path, f"not valid JSON ({e})") from None
  if not isinstance(model, dict) or "modelTopology" not in model or "weightsManifest" not in model:
    raise _fail(path, "not a TensorFlow.js model.json (no modelTopology / weightsManifest)")
  fmt = model.get("format", "graph-model")
  topology = model["modelTopology"]
  if fmt == "layers-model" or (isinstance(topology, dict) and "model_config" in topology):
    raise _fail(path, "a TF.js *layers* model (Keras JSON), not a graph model; convert it with "
                      "`tensorflowjs_converter --output_format=tfjs_graph_model` first")
  if not isinstance(topology, dict) or not isinstance(topology.get("node"), list):
    raise _fail(path, "modelTopology has no node list; not a TF.js graph model")
  functions = (topology.get("library") or {}).get("function") or []
  if functions:
    raise _fail(path, f"the graph holds {len(functions)} functions (control flow or a StatefulPartitionedCall), which "
                      "are not supported: only flat inference graphs are")
  if not isinstance(model["weightsManifest"], list):
    raise _fail(path, "weightsManifest is not a list of weight groups")
  return model


def parse_nodes(model: Mapping[str, Any], path: pathlib.Path) -> tuple[TFNode, ...]:
  """The NodeDefs of `model.json` as `TFNode`s; duplicate names and nodes without name or op are refused."""
  nodes, seen = [], set()
  for i, raw in enumerate(model["modelTopology"]["node"]):
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("op"), str):
      raise _fail(path, f"node {i} has no name or op")
    if raw["name"] in seen:
      raise _fail(path, f"two nodes are named {raw['name']!r}")
    seen.add(raw["name"])
    inputs = tuple(s for s in raw.get("input", []) if not s.startswith("^"))  # control edges carry no data
    attrs = {k: decode_attr(v) for k, v in (raw.get("attr") or {}).items()}
    nodes.append(TFNode(raw["name"], raw["op"], inputs, attrs))
  return tuple(nodes)


def shard_path(root: pathlib.Path, rel: Any, model_path: pathlib.Path) -> pathlib.Path:
  """`root / rel` when it stays inside `root` (symbolic links resolved); anything else is refused."""
  if not isinstance(rel, str) or not rel:
    raise _fail(model_path, f"weight shard path {rel!r} is not a file name")
  if os.path.isabs(rel) or rel.startswith(("/", "\\")) or "://" in rel:
    raise _fail(model_path, f"refused: weight shard path {rel!r} is absolute or a URL; a model's shards lie beside "
                            "its model.json")
  candidate = (root / rel).resolve()
  try:
    candidate.relative_to(root.resolve())
  except ValueError:
    raise _fail(model_path, f"refused: weight shard path {rel!r} leaves the model's folder {root}") from None
  return candidate


def _shape(entry: Mapping[str, Any], model_path: pathlib.Path) -> tuple[int, ...]:
  shape = entry.get("shape", [])
  name = entry.get("name")
  if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
      isinstance(d, int) and not isinstance(d, bool) for d in shape):
    raise _fail(model_path, f"refused: weight {name!r} has shape {shape!r}, not a list of at most {MAX_RANK} integers")
  if any(d < 0 for d in shape):
    raise _fail(model_path, f"refused: weight {name!r} has negative dimensions {shape}")
  size = 1
  for d in shape:
    size *= d
  if size > MAX_ELEMENTS:
    raise _fail(model_path, f"refused: weight {name!r} of shape {shape} has {size} elements (limit {MAX_ELEMENTS}); "
                            "the manifest is damaged")
  return tuple(shape)


def check_manifest(model: Mapping[str, Any],
                   path: pathlib.Path) -> tuple[list[ManifestEntry], list[list[pathlib.Path]]]:
  """Every entry's layout and every group's shard files, checked without reading a shard.

  Returns:
    The entries (with group, byte offset, byte count and quantisation) and, per group, its shard paths.

  Raises:
    CheckpointError: a path leaving the model's folder, a missing shard, an unknown dtype or quantisation, an absurd
      shape or total, or a group whose shards are shorter than its entries need, each named in one line.
  """
  root = path.parent
  entries: list[ManifestEntry] = []
  groups: list[list[pathlib.Path]] = []
  names: set[str] = set()
  total = 0
  for g, group in enumerate(model["weightsManifest"]):
    if not isinstance(group, dict) or not isinstance(group.get("paths"), list) or not isinstance(
        group.get("weights"), list):
      raise _fail(path, f"weight group {g} has no paths / weights lists")
    files = [shard_path(root, rel, path) for rel in group["paths"]]
    offset = 0
    for raw in group["weights"]:
      if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise _fail(path, f"weight group {g} has an entry without a name")
      name = raw["name"]
      if name in names:
        raise _fail(path, f"weight {name!r} appears twice in the manifest")
      names.add(name)
      shape = _shape(raw, path)
      dtype = raw.get("dtype", "float32")
      if dtype not in DTYPES:
        raise _fail(path, f"weight {name!r} has dtype {dtype!r}; supported: {', '.join(DTYPES)} (strings and complex "
                          "weights have no place in a face-recognition graph)")
      q = raw.get("quantization")
      scale = minimum = None
      stored = dtype
      if q is not None:
        stored = q.get("dtype") if isinstance(q, dict) else None
        if stored not in QUANTISED:
          raise _fail(path, f"weight {name!r} has quantisation {q!r}; supported: float16, uint8, uint16 (affine "
                            "q * scale + min)")
        if stored in ("uint8", "uint16", "int8"):
          try:
            scale, minimum = float(q["scale"]), float(q["min"])
          except (KeyError, TypeError, ValueError):
            raise _fail(path, f"weight {name!r}: {stored} quantisation without a numeric scale and min "
                              f"({q!r})") from None
          if not (np.isfinite(scale) and np.isfinite(minimum)):
            raise _fail(path, f"weight {name!r}: quantisation scale / min are not finite ({q!r})")
        elif dtype != "float32":
          raise _fail(path, f"weight {name!r}: float16 storage of a {dtype} weight is not a TF.js quantisation")
      size = int(np.prod(shape, dtype=np.int64))
      nbytes = size * np.dtype(QUANTISED.get(stored, DTYPES.get(stored))).itemsize
      total += size * 4
      if total > MAX_TOTAL_BYTES:
        raise _fail(path, f"refused: the weights would take more than {MAX_TOTAL_BYTES >> 30} GiB once decoded; the "
                          "manifest is damaged")
      entries.append(ManifestEntry(name, shape, dtype, stored, g, offset, nbytes, scale, minimum))
      offset += nbytes
    missing = [f for f in files if not f.is_file()]
    if missing:
      raise _fail(path, f"weight shard {missing[0].name} of group {g} does not exist beside the model.json")
    have = sum(f.stat().st_size for f in files)
    if have < offset:
      raise _fail(path, f"refused: the shards of weight group {g} ({', '.join(f.name for f in files)}) hold {have} "
                        f"bytes, but its {len(group['weights'])} weights need {offset}: a shard is truncated or "
                        "belongs to another model; download it again")
    groups.append(files)
  return entries, groups


def decode_entry(entry: ManifestEntry, raw: bytes) -> np.ndarray:
  """One weight's bytes -> float32 / int32 / bool array of its shape (dequantised)."""
  stored = np.dtype(QUANTISED.get(entry.stored, DTYPES.get(entry.stored))).newbyteorder("<")
  values = np.frombuffer(raw, dtype=stored, count=entry.size)
  if entry.scale is not None:
    values = values.astype(np.float64) * entry.scale + entry.minimum
    if entry.dtype == "int32":
      values = np.round(values)
  out = values.astype(DTYPES[entry.dtype], copy=True)
  return out.reshape(entry.shape)


def read_graph_model(path: str | os.PathLike[str]) -> GraphModel:
  """Reads and checks `model.json` and its shards (see the module docstring).

  Raises:
    FileNotFoundError: the model.json does not exist.
    CheckpointError: a one-line message naming the file and the problem; nothing is read from a shard before the
      manifest has passed `check_manifest`.
  """
  path = pathlib.Path(path)
  model = read_model_json(path)
  nodes = parse_nodes(model, path)
  entries, groups = check_manifest(model, path)
  weights: dict[str, np.ndarray] = {}
  for g, files in enumerate(groups):
    group_entries = [e for e in entries if e.group == g]
    need = sum(e.nbytes for e in group_entries)
    data = bytearray()
    for f in files:
      if len(data) >= need:
        break
      data += f.read_bytes()
    for e in group_entries:
      weights[e.name] = decode_entry(e, bytes(data[e.offset:e.offset + e.nbytes]))
  const_names = {n.name for n in nodes if n.op == "Const"}
  missing = sorted(const_names - set(weights))
  if missing:
    raise _fail(path, f"{len(missing)} Const nodes have no weights in the manifest ({', '.join(missing[:5])})")
  meta = {k: model[k] for k in ("format", "generatedBy", "convertedBy") if k in model}
  return GraphModel(path=path, nodes=nodes, weights=weights, entries=tuple(entries),
                    signature=model.get("signature") or {}, meta=meta,
                    shard_files=tuple(f for files in groups for f in files))


def signature_names(signature: Mapping[str, Any], key: str) -> list[str]:
  """Node names of the signature's `inputs` / `outputs` (the `:0` output suffix removed), in file order."""
  out = []
  for k, v in (signature.get(key) or {}).items():
    name = v.get("name", k) if isinstance(v, Mapping) else k
    out.append(strip_output_index(name))
  return out


def strip_output_index(name: str) -> str:
  """`"node:0"` -> `"node"`; any other output index is kept (`"node:1"`) for the caller to refuse."""
  return name[:-2] if name.endswith(":0") else name


def write_graph_model(folder: str | os.PathLike[str], nodes: Sequence[Mapping[str, Any]],
                      weights: Mapping[str, np.ndarray], name: str = "model",
                      quantization: Mapping[str, Mapping[str, Any]] | None = None,
                      signature: Mapping[str, Any] | None = None, shards: int = 1) -> pathlib.Path:
  """Writes a TF.js graph model (for tests and tools): `nodes` as NodeDef JSON (attrs already encoded), `weights` in
  one group split into `shards` files, `quantization[name]` optional per weight (`{"dtype": "float16"}` or
  `{"dtype": "uint8", "scale": s, "min": m}`: the values are quantised here). Returns the model.json path."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  entries, blob = [], b""
  for key, value in weights.items():
    value = np.asarray(value)
    dtype = "int32" if np.issubdtype(value.dtype, np.integer) else ("bool" if value.dtype == np.bool_ else "float32")
    entry: dict[str, Any] = {"name": key, "shape": list(value.shape), "dtype": dtype}
    q = (quantization or {}).get(key)
    if q is None:
      blob += np.ascontiguousarray(value, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes()
    elif q["dtype"] == "float16":
      entry["quantization"] = {"dtype": "float16", "original_dtype": dtype}
      blob += np.ascontiguousarray(value, dtype="<f2").tobytes()
    else:
      stored = np.dtype(QUANTISED[q["dtype"]])
      qv = np.clip(np.round((value.astype(np.float64) - q["min"]) / q["scale"]), np.iinfo(stored).min,
                   np.iinfo(stored).max)
      entry["quantization"] = {"dtype": q["dtype"], "scale": q["scale"], "min": q["min"], "original_dtype": dtype}
      blob += np.ascontiguousarray(qv, dtype=stored.newbyteorder("<")).tobytes()
    entries.append(entry)
  cut = [len(blob) * i // shards for i in range(shards + 1)]
  paths = []
  for i in range(shards):
    shard = f"{name}.bin" if shards == 1 else f"{name}-shard{i + 1}of{shards}.bin"
    (folder / shard).write_bytes(blob[cut[i]:cut[i + 1]])
    paths.append(shard)
  model = {"format": "graph-model", "generatedBy": "erasablemask_jax tests", "convertedBy": "write_graph_model",
           "signature": dict(signature or {}), "modelTopology": {"node": list(nodes), "library": {}, "versions": {}},
           "weightsManifest": [{"paths": paths, "weights": entries}]}
  out = folder / f"{name}.json"
  out.write_text(json.dumps(model))
  return out


def encode_attr(value: Any) -> dict[str, Any]:
  """Python -> AttrValue JSON (the inverse of `decode_attr` for str, int, float, bool and lists of them)."""
  if isinstance(value, bool):
    return {"b": value}
  if isinstance(value, int):
    return {"i": str(value)}
  if isinstance(value, float):
    return {"f": value}
  if isinstance(value, str):
    return {"s": base64.b64encode(value.encode()).decode()}
  if isinstance(value, (list, tuple)):
    if all(isinstance(v, str) for v in value) and value:
      return {"list": {"s": [base64.b64encode(v.encode()).decode() for v in value]}}
    if all(isinstance(v, float) for v in value) and value:
      return {"list": {"f": list(value)}}
    return {"list": {"i": [str(int(v)) for v in value]}} if value else {"list": {}}
  raise TypeError(f"cannot encode attribute value {value!r}")
