"""Registry of convertible architectures.

An `ArchSpec` knows how to build the Flax module, the shape of the batch its `init` takes, how to turn a torch state
dict into flat Flax variable paths (`rename`), and the card entries (preprocessing, embedding size, ...) written beside
the converted weights. PyTorch architectures read state dicts; MXNet ones (`checkpoint_format="mxnet"`) read `.params`
files through `erasablemask_jax.convert.mxnet` and check the `-symbol.json` graph beside them.

The registry knows none of its clients: a module that provides architectures calls `register_arch(name, spec)` at
import time, and whoever looks an architecture up imports the providers it needs first (the converter CLI imports
every provider; `fr.load` imports the face-recognition zoo). Example, in `erasablemask_jax/align/archs.py`:

    from erasablemask_jax import convert
    convert.register_arch("mtcnn_pnet", convert.ArchSpec(
        name="mtcnn_pnet", build=PNet, input_shape=(12, 12, 3),
        rename=lambda sd: convert.torch_to_flax_flat(sd), card={"kind": "detector", ...}))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

_REGISTRY: dict[str, "ArchSpec"] = {}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """One convertible architecture.

  Attributes:
    name: registry name (`iresnet100`, `mobilefacenet`, ...).
    build: returns the Flax linen module (called with no arguments).
    input_shape: `(H, W, C)` of one example for `module.init`.
    rename: the checkpoint's arrays (a torch state dict, or MXNet `arg:`/`aux:` arrays; numpy) ->
      `{"params/...": array, "batch_stats/...": array}`.
    card: JSON-serialisable entries for `card.json` (preprocessing, embedding size, source repository, ...).
    description: one line for `--help` listings.
    checkpoint_format: `"torch"` (`.pth`/`.pt`/`.ckpt`/`.safetensors` state dicts, `rename` takes torch names),
      `"mxnet"` (`.params` NDArray lists, `rename` takes `arg:NAME` / `aux:NAME`) or `"tfjs"` (a TF.js graph
      model's `model.json`, converted by `convert_graph`, not `rename`).
    symbol_layers: MXNet architectures only: returns the layers (`{name: {"op": ..., attr: value}}`, the form of
      `convert.mxnet.graph_layers`) that a `-symbol.json` of this architecture must hold; checked when a symbol is
      found beside the checkpoint or given.
    from_card: for architectures whose module depends on the converted model (a TF.js graph): `from_card(card)` ->
      `(module, input_shape)`; `build` and `input_shape` are then unused.
    convert_graph: TF.js only: `convert_graph(graph_model, model_sha256=..., input_name=..., output_name=...,
      preprocess=...)` -> `(variables, card entries)`.
  """
  name: str
  build: Callable[[], Any]
  input_shape: tuple[int, int, int]
  rename: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
  card: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""
  checkpoint_format: str = "torch"
  symbol_layers: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None
  from_card: Callable[[Mapping[str, Any]], tuple[Any, tuple[int, int, int]]] | None = None
  convert_graph: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None

  def module_for(self, card: Mapping[str, Any] | None = None) -> tuple[Any, tuple[int, int, int]]:
    """`(module, input_shape)` of this architecture for a model card (the card matters only with `from_card`)."""
    if self.from_card is not None:
      if card is None:
        raise ValueError(f"architecture {self.name!r} is built from a converted model's card; pass the card")
      return self.from_card(card)
    return self.build(), self.input_shape


def register_arch(name: str, spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
  """Adds `spec` under `name`; registering a different spec under a taken name raises unless `overwrite`."""
  if name in _REGISTRY and not overwrite and _REGISTRY[name] is not spec:
    raise ValueError(f"architecture {name!r} is already registered; pass overwrite=True to replace it")
  _REGISTRY[name] = spec
  return spec


def list_archs() -> list[str]:
  """Sorted names of every architecture registered so far (by the provider modules imported)."""
  return sorted(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
  """The spec registered as `name`; an unknown name raises `KeyError` listing the known ones."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))} (an architecture is known "
                   "once the module that registers it is imported)")
  return _REGISTRY[name]
