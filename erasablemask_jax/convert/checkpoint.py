"""End-to-end conversion of one checkpoint (PyTorch state dict, MXNet `.params` or a TF.js graph model's `model.json`)
into a model directory."""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
from typing import Any

import numpy as np

from erasablemask_jax.convert import merge
from erasablemask_jax.convert import model_dir as model_dir_lib
from erasablemask_jax.convert import mxnet
from erasablemask_jax.convert import registry
from erasablemask_jax.convert import state_dict as state_dict_lib
from erasablemask_jax.convert import tfjs

CONVERTER_VERSION = "1"


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


FORMAT_NAMES = {"torch": "PyTorch", "mxnet": "MXNet", "tfjs": "TensorFlow.js graph model"}
# A wrong architecture mismatches most of its hundreds of tensors: the error gives the counts, the first few keys of
# each kind, and the registered architecture the checkpoint matches best.
LISTED_KEYS = 10
LIKELY_MIN_MATCH = 0.5


def convert_state_dict(arch: str, state: dict[str, Any], context: str = "",
                       limit: int | None = None) -> dict[str, Any]:
  """Torch state dict (or MXNet `arg:`/`aux:` arrays) -> Flax variables of `arch`.

  Renames and re-lays with the architecture's `rename`, then `strict_merge`s against `eval_shape`; `limit` caps the
  keys listed per kind of mismatch in the error, which also names the registered architecture (of the same checkpoint
  format) that the checkpoint matches best, when one matches at least half of its tensors.
  """
  spec = registry.get_arch(arch)
  flat = spec.rename(state)
  abstract = merge.abstract_init(spec.build(), spec.input_shape)
  try:
    return merge.strict_merge(flat, abstract, context=context or f"arch {arch}", limit=limit)
  except merge.StrictMergeError as e:
    raise merge.StrictMergeError(e.missing, e.unexpected, e.mismatched, e.context, limit,
                                 hint=_likely_arch_hint(state, spec)) from None


def match_fraction(arch: str, state: dict[str, Any]) -> float:
  """The share of `arch`'s variables and the renamed checkpoint's tensors that pair up by name and shape (0 to 1)."""
  spec = registry.get_arch(arch)
  flat = spec.rename(state)
  want = merge.flatten_variables(merge.abstract_init(spec.build(), spec.input_shape))
  hits = sum(1 for k, v in want.items() if k in flat and tuple(np.shape(flat[k])) == tuple(v.shape))
  return hits / max(len(want) + sum(1 for k in flat if k not in want), 1)


def _likely_arch_hint(state: dict[str, Any], spec: registry.ArchSpec) -> str | None:
  scores = []
  for name in registry.list_archs():
    if name == spec.name or registry.get_arch(name).checkpoint_format != spec.checkpoint_format:
      continue
    try:
      scores.append((match_fraction(name, state), name))
    except Exception:  # pylint: disable=broad-except  # another architecture's rename may reject these names outright
      continue
  if not scores or max(scores)[0] < LIKELY_MIN_MATCH:
    return None
  score, name = max(scores)
  how = "every tensor matches" if score == 1.0 else f"{100 * score:.0f}% of the tensors match"
  return f"The checkpoint is for a different --arch: it looks like --arch {name} ({how})."


def _read_mxnet(spec: registry.ArchSpec, checkpoint: pathlib.Path,
                symbol: pathlib.Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads `.params`, checks the graph (given, or `PREFIX-symbol.json` beside it) and the values; returns the arrays
  and the card's `source` entries for the symbol."""
  params = mxnet.read_ndarray_list(checkpoint)
  symbol = symbol if symbol is not None else mxnet.symbol_path_for(checkpoint)
  source: dict[str, Any] = {}
  if symbol is not None:
    graph = mxnet.read_symbol(symbol)
    context = f"--arch {spec.name}, checkpoint {checkpoint.name}"
    if spec.symbol_layers is not None:
      mxnet.check_layers(graph, spec.symbol_layers(), context=context)
    h, w, c = spec.input_shape
    mxnet.check_params_match_symbol(params, graph, (1, c, h, w), context=str(checkpoint))
    source["symbol"] = {"file": symbol.name, "sha256": sha256_file(symbol)}
  state_dict_lib.check_finite(params, context=str(checkpoint))
  return params, source


def _format_of(checkpoint: pathlib.Path) -> str:
  if tfjs.is_graph_model(checkpoint):
    return "tfjs"
  return "mxnet" if mxnet.is_params_file(checkpoint) else "torch"


def _convert_tfjs(spec: registry.ArchSpec, checkpoint: pathlib.Path, source: dict[str, Any], input_name: str | None,
                  output_name: str | None, preprocess: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads and checks a TF.js graph model and builds its program and variables (`spec.convert_graph`, which traces
  the program once to find the output's shape; `fr.load` checks the saved variables against the program strictly)."""
  graph = tfjs.read_graph_model(checkpoint)
  state_dict_lib.check_finite(graph.weights, context=str(checkpoint))
  variables, card = spec.convert_graph(graph, model_sha256=source["sha256"], input_name=input_name,
                                       output_name=output_name, preprocess=preprocess)
  source["weights"] = [{"file": f.name, "sha256": sha256_file(f)} for f in graph.shard_files]
  source["format"] = "tfjs"
  return variables, card


def convert_checkpoint(arch: str, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       force: bool = False, symbol: str | os.PathLike[str] | None = None, *,
                       input_name: str | None = None, output_name: str | None = None,
                       preprocess: str | None = None) -> pathlib.Path:
  """Converts `checkpoint` as architecture `arch` into `out_dir` (orbax variables + `card.json`).

  Every check (architecture known, output free, file readable and safe, graph consistent, values finite, strict
  match) happens before anything is written, so a failure leaves the file system as it was.

  Args:
    arch: a registered architecture name (`registry.list_archs()`).
    checkpoint: `.pth`/`.pt`/`.ckpt` (read with `torch.load(weights_only=True)`) or `.safetensors` for PyTorch
      architectures; an MXNet `PREFIX-EPOCH.params` for MXNet ones; a TF.js graph model's `model.json` (its `.bin`
      shards beside it) for `tfjs`.
    out_dir: destination directory.
    force: replace an existing `out_dir`.
    symbol: MXNet only: the `-symbol.json` to check the parameters against (default `PREFIX-symbol.json` beside the
      checkpoint, when it exists).
    input_name, output_name, preprocess: TF.js only (`--input`, `--output`, `--preprocess`): the graph's image input,
      its embedding output and how pixels are normalised (`fr.tfjs_graph.parse_preprocess`); a known graph brings its
      own output and preprocessing.

  Returns:
    The written directory.
  """
  spec = registry.get_arch(arch)
  model_dir_lib.check_writable(out_dir, force)
  checkpoint = state_dict_lib.require_checkpoint_file(checkpoint)
  fmt = _format_of(checkpoint)
  if fmt != spec.checkpoint_format:
    raise state_dict_lib.CheckpointError(
        f"{checkpoint} is in the {FORMAT_NAMES[fmt]} format, but --arch {arch} converts "
        f"{FORMAT_NAMES.get(spec.checkpoint_format, spec.checkpoint_format)} checkpoints; choose the architecture "
        "the checkpoint was trained with")
  if symbol is not None and fmt != "mxnet":
    raise state_dict_lib.CheckpointError(f"--symbol {symbol}: only MXNet .params checkpoints have a symbol graph")
  graph_options = {"--input": input_name, "--output": output_name, "--preprocess": preprocess}
  given = [k for k, v in graph_options.items() if v is not None]
  if given and fmt != "tfjs":
    raise state_dict_lib.CheckpointError(f"{', '.join(given)}: only TF.js graph models have graph inputs, outputs "
                                         "and a preprocessing to choose")
  context = f"--arch {arch}, checkpoint {checkpoint.name}"
  source: dict[str, Any] = {"file": checkpoint.name, "sha256": sha256_file(checkpoint)}
  card_extra: dict[str, Any] = {}
  if fmt == "tfjs":
    variables, card_extra = _convert_tfjs(spec, checkpoint, source, input_name, output_name, preprocess)
  elif fmt == "mxnet":
    state, extra = _read_mxnet(spec, checkpoint, pathlib.Path(symbol) if symbol is not None else None)
    source.update(extra, format="mxnet")
  else:
    state = state_dict_lib.read_state_dict(checkpoint)
    state_dict_lib.check_finite(state, context=str(checkpoint))
  if fmt != "tfjs":
    variables = convert_state_dict(arch, state, context=context, limit=LISTED_KEYS)
  card = dict(spec.card)
  card.update(card_extra)
  card.update({
      "arch": arch,
      "source": source,
      "converter_version": CONVERTER_VERSION,
      "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  })
  card.setdefault("thresholds", {})
  return model_dir_lib.write_model_dir(out_dir, variables, card, force=force)
