"""Loading converted face-recognition models as recognisers.

A `Recogniser` holds the Flax module, its variables and its card. Its `apply_fn(variables, images)` is a pure function
from [-1, 1] float NHWC images of any size to L2-normalised embeddings,

    e = f(preprocess(images)),    apply_fn(variables, images) = e / max(||e||_2, 1e-12),

that the attack differentiates through (jit, grad, vmap all apply); `embed(images)` is the convenience batch method
that also takes uint8 RGB.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax import convert
from erasablemask_jax.fr import archs as _archs  # noqa: F401  (registers the architectures `load` looks up)
from erasablemask_jax.fr import fold
from erasablemask_jax.fr import tfjs_graph
from erasablemask_jax.fr import thresholds as thresholds_lib
from erasablemask_jax.fr.preprocess import Preprocessing
from erasablemask_jax.fr.preprocess import preprocess
from erasablemask_jax.image_io import uint8_to_minus1_1

ASSETS_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "fr"
BUNDLED = {"mobilefacenet": "mobilefacenet_foamliu"}


def l2_normalise(e: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """`e / max(||e||_2, eps)` along the last axis."""
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)


def embed_apply(net: nn.Module | Callable[[Mapping[str, Any], jnp.ndarray], jnp.ndarray], prep: Preprocessing,
                variables: Mapping[str, Any], images: jnp.ndarray, normalise: bool = True) -> jnp.ndarray:
  """Pure embedding function: [-1, 1] NHWC images -> (L2-normalised) embeddings `(N, D)`.

  `net` is the Flax module, or a pure `net(variables, preprocessed)` that replaces its `apply` (`fr.fold`)."""
  net_apply = net.apply if isinstance(net, nn.Module) else net
  e = net_apply(variables, preprocess(images, prep))
  return l2_normalise(e) if normalise else e


class Recogniser:
  """A face-recognition network with its preprocessing.

  Attributes:
    module: the Flax module (inference mode).
    variables: `{'params', 'batch_stats'}` as jax arrays.
    card: the model card (`arch`, `input_size`, `preprocessing`, `embedding_size`, `thresholds`,
      `thresholds_by_view`, ...).
    preprocessing: the parsed `Preprocessing`.
    apply_fn: `apply_fn(variables, images_minus1_1) -> L2-normalised embeddings`, pure and differentiable.
    raw_apply_fn: the same without the final normalisation.
    net_apply: `net_apply(variables, preprocessed) -> raw embeddings`: `module.apply`, or the folded network's.
    folded: whether the inference BatchNorms that follow convolutions are folded into them (`fold_batchnorm`).
  """

  def __init__(self, module: nn.Module, variables: Mapping[str, Any], card: Mapping[str, Any],
               directory: pathlib.Path | None = None,
               net_apply: Callable[[Mapping[str, Any], jnp.ndarray], jnp.ndarray] | None = None):
    """`net_apply(variables, preprocessed)` replaces `module.apply` (the folded network of `fold_batchnorm`)."""
    self.module = module
    # Abstract leaves (`jax.ShapeDtypeStruct`: an ahead-of-time compile's surrogate, `from_abstract`) stay abstract.
    self.variables = jax.tree_util.tree_map(lambda v: v if isinstance(v, jax.ShapeDtypeStruct) else jnp.asarray(v),
                                            dict(variables))
    self.card = dict(card)
    self.directory = directory
    self.preprocessing = Preprocessing.from_card(card)
    self.folded = net_apply is not None
    self.net_apply = module.apply if net_apply is None else net_apply
    self.apply_fn = functools.partial(embed_apply, self.net_apply, self.preprocessing)
    self.raw_apply_fn = functools.partial(embed_apply, self.net_apply, self.preprocessing, normalise=False)
    self._jit_raw = jax.jit(self.raw_apply_fn)

  def fold_batchnorm(self) -> Recogniser:
    """This network with each inference BatchNorm that follows a convolution folded into it (`fr.fold`): the same
    function up to float rounding, with fewer elementwise passes in the attack's gradients (the trainer's default,
    `config.fr.fold_batchnorm`). Returns `self` when already folded."""
    if self.folded:
      return self
    if isinstance(self.module, tfjs_graph.GraphNet):  # a TF.js graph folds by rewriting itself
      fold_fn = functools.partial(tfjs_graph.fold_graph_net, self.module)
    else:
      example = jax.ShapeDtypeStruct((1, *self.input_size, 3), jnp.float32)
      fold_fn = lambda variables: fold.fold_batchnorm(self.module, variables, example)
    applies = []

    def folded(variables):
      variables, net_apply = fold_fn(variables)
      applies.append(net_apply)
      return variables

    if self.is_abstract:
      variables = jax.eval_shape(folded, self.variables)
    else:
      variables = folded(self.variables)
    return Recogniser(self.module, variables, self.card, self.directory, net_apply=applies[0])

  @property
  def is_abstract(self) -> bool:
    """Whether the variables are shapes and dtypes only (`from_abstract`): compiled ahead of time, never run."""
    return any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree_util.tree_leaves(self.variables))

  @property
  def name(self) -> str:
    return str(self.card.get("name", self.card.get("arch", "fr")))

  @property
  def input_size(self) -> tuple[int, int]:
    return self.preprocessing.input_size

  @property
  def embedding_size(self) -> int:
    return int(self.card["embedding_size"])

  @property
  def thresholds(self) -> dict[str, float]:
    """The thresholds calibrated on ArcFace-aligned crops, e.g. `{"far_0.01": 0.27, ...}` (empty until
    `calibrate --store`); `thresholds_by_view` has every view's."""
    return self.thresholds_by_view.get(thresholds_lib.ARCFACE112, {})

  @property
  def thresholds_by_view(self) -> dict[str, dict[str, float]]:
    """`{view: {far_key: t}}` (`fr.thresholds`)."""
    return thresholds_lib.thresholds_by_view(self.card)

  def threshold(self, far: float = 0.01, view: str = thresholds_lib.ARCFACE112) -> float:
    """The cosine threshold calibrated on `view` at false-accept rate `far` (accept a pair when `cos > threshold`).

    Strict: no fallback to another view (`find_threshold` has the labelled fallbacks the reports use).
    """
    found = self.find_threshold(far, view)
    if found is None or found.kind != thresholds_lib.CALIBRATED:
      have = {v: sorted(t) for v, t in self.thresholds_by_view.items()}
      raise KeyError(f"{self.name}: no threshold calibrated on view {view} at FAR {far:g} (have {have}); run "
                     "`erasablemask calibrate --fr DIR --faces FOLDER --identities FILE --out FILE.json --store`"
                     + ("" if view == thresholds_lib.ARCFACE112 else " with --view/--image-size or --run"))
    return found.value

  def find_threshold(self, far: float = 0.01, view: str | None = thresholds_lib.ARCFACE112,
                     source: str = "calibrated") -> thresholds_lib.Threshold | None:
    """`fr.thresholds.lookup` on this model's card: the view's threshold, else a labelled fallback, else None."""
    return thresholds_lib.lookup(self.card, far, view, source)

  def embed(self, images: np.ndarray | jnp.ndarray | Sequence[np.ndarray], *, flip: bool = False,
            batch_size: int = 64) -> np.ndarray:
    """L2-normalised embeddings of a batch.

    Args:
      images: uint8 RGB `(N, H, W, 3)` or float [-1, 1] `(N, H, W, 3)` of any size (or a list of `(H, W, 3)`
        images, which may differ in size).
      flip: return `normalise(f(x) + f(mirror(x)))` (test-time flip augmentation).
      batch_size: images per jitted call.

    Returns:
      `(N, D)` float32 numpy array.
    """
    if isinstance(images, (list, tuple)):
      if len({np.shape(im) for im in images}) > 1:
        return np.concatenate([self.embed(np.asarray(im)[None], flip=flip) for im in images])
      images = np.stack([np.asarray(im) for im in images])
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC RGB with 3 channels, got shape {images.shape}")
    out = []
    batch_size = min(batch_size, images.shape[0])
    for start in range(0, images.shape[0], batch_size):
      x = images[start:start + batch_size]
      n = x.shape[0]
      if n < batch_size:  # pad the last batch so that one compiled shape serves every call
        x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
      x = uint8_to_minus1_1(x) if x.dtype == np.uint8 else jnp.asarray(x, jnp.float32)
      e = self._jit_raw(self.variables, x)
      if flip:
        e = e + self._jit_raw(self.variables, x[:, :, ::-1, :])
      out.append(np.asarray(l2_normalise(e))[:n])
    return np.concatenate(out) if out else np.zeros((0, self.embedding_size), np.float32)


def from_variables(arch: str, variables: Mapping[str, Any], card: Mapping[str, Any] | None = None) -> Recogniser:
  """A recogniser for already-converted `variables` of a registered `arch` (card defaults to the arch's)."""
  spec = convert.get_arch(arch)
  full_card = dict(spec.card)
  full_card["arch"] = arch
  full_card.update(card or {})
  module, _ = spec.module_for(full_card)
  return Recogniser(module, variables, full_card)


def from_abstract(arch: str, card: Mapping[str, Any] | None = None) -> Recogniser:
  """A recogniser of a registered `arch` whose variables are abstract (`jax.eval_shape` of its init: shapes and
  dtypes, no weights), for compiling the attack ahead of time where the converted weights are absent."""
  spec = convert.get_arch(arch)
  return from_variables(arch, convert.abstract_init(spec.build(), spec.input_shape), card)


# What `Recogniser` reads from a card: a card without one of these was not written by the converter.
CARD_KEYS = ("arch", "input_size", "embedding_size", "preprocessing")


class UnknownBundledModel(KeyError):
  """`bundled:NAME` names no model shipped in the package (a KeyError whose message prints without quotes)."""

  def __str__(self) -> str:
    return str(self.args[0])


def load(directory: str | os.PathLike[str]) -> Recogniser:
  """Loads a model directory written by `tools.convert_torch_weights` (orbax variables + `card.json`).

  Raises:
    ModelDirError: the card lacks a field the model needs (`CARD_KEYS`, the preprocessing's mean/std).
    StrictMergeError: the saved variables do not fit the card's architecture (counts and the first keys of each kind).
  """
  directory = pathlib.Path(directory)
  variables, card = convert.read_model_dir(directory)
  missing = [k for k in CARD_KEYS if k not in card]
  missing += [f"preprocessing.{k}" for k in ("mean", "std")
              if isinstance(card.get("preprocessing"), dict) and k not in card["preprocessing"]]
  if missing:
    raise convert.ModelDirError(f"{directory / convert.CARD_FILE} lacks {', '.join(missing)}: it was not written by "
                                "the converter (or was edited); convert the checkpoint again")
  spec = convert.get_arch(card["arch"])
  module, input_shape = spec.module_for(card)
  abstract = convert.abstract_init(module, input_shape)
  variables = convert.strict_merge(
      convert.flatten_variables(variables), abstract, context=f"{directory}, card arch {card['arch']}", limit=5,
      hint="The saved variables are not those of the card's architecture: the folder was damaged or edited; convert "
           "the checkpoint again into a new folder.")
  return Recogniser(module, variables, card, directory=directory)


def bundled_dir(name: str = "mobilefacenet") -> pathlib.Path:
  """Directory of a model shipped inside the package (`BUNDLED` names them)."""
  if name not in BUNDLED:
    raise UnknownBundledModel(f"no bundled face-recognition model {name!r}; bundled: "
                              f"{', '.join('bundled:' + n for n in sorted(BUNDLED))}")
  return ASSETS_DIR / BUNDLED[name]


def load_bundled(name: str = "mobilefacenet") -> Recogniser:
  """The bundled converted foamliu MobileFaceNet (Apache-2.0), the demo config's default surrogate."""
  return load(bundled_dir(name))
