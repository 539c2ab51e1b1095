"""The white-box surrogates of the attack and the target identity's embeddings.

A surrogate spec is a converted FR directory (`tools.convert_torch_weights`), `bundled:NAME` or `shared:NAME` (one of
the six real models of ../shared/assets, converted once into a cache: `fr.real_models`), optionally with a view
suffix: `@flip` scores the mirrored image. A mirrored view of one network is a different function of `x_adv` and lets
the demo run the meta-auxiliary attack (which needs K >= 2 surrogates) with the single bundled network; real runs list
different networks.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from erasablemask_jax.fr import real_models
from erasablemask_jax.fr import thresholds
from erasablemask_jax.fr import views
from erasablemask_jax import convert
from erasablemask_jax.fr.recogniser import Recogniser, bundled_dir, from_abstract, load, load_bundled

VIEWS = ("", "flip")
INPUT_CROPS = views.INPUT_CROPS
arcface_box_in_loose = views.arcface_box_in_loose  # the view maths lives in `fr.views` (calibration needs it too)
crop_to_box = views.crop_to_box


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """A face-recognition network as the attack sees it: a pure `apply(variables, x_in_minus1_1) -> embeddings`.

  `view` names the crop and resize of the generator's output it scores; the reports take its thresholds from that
  view (`taus`).
  """

  spec: str
  recogniser: Recogniser
  apply: Callable[[Any, jax.Array], jax.Array]
  view: str | None = None  # `fr.views.view_name(input_crop, image_size)`; None when the image size was not given

  @property
  def variables(self):
    return self.recogniser.variables

  def taus(self, fr_config, source: str | None = None) -> dict[str, thresholds.Threshold | None]:
    """tau1 and tau2 of `fr_config` for the view this surrogate scores (`fr.thresholds.taus`)."""
    return thresholds.taus(self.recogniser.card, fr_config, self.view, source)

  def embed(self, images_minus1_1: jax.Array) -> jax.Array:
    return jax.jit(self.apply)(self.variables, images_minus1_1)


def load_surrogate(spec: str, input_crop: str = "none", image_size: int | None = None,
                   fold_batchnorm: bool = False) -> Surrogate:
  """`DIR`, `bundled:NAME`, `shared:NAME`, each optionally `@flip`; `input_crop` as `config.fr.input_crop`;
  `image_size` the side of the faces it will score (names its view); `fold_batchnorm` as `config.fr.fold_batchnorm`
  (`Recogniser.fold_batchnorm`: the same function, faster to differentiate)."""
  views.check_input_crop(input_crop)
  source, _, mirror = spec.partition("@")
  if mirror not in VIEWS:
    raise ValueError(f"FR model {spec!r}: unknown view {mirror!r}; use one of {[v for v in VIEWS if v]} or none")
  if source.startswith("bundled:"):
    recogniser = load_bundled(source.removeprefix("bundled:"))
  elif source.startswith(real_models.PREFIX):
    recogniser = load(real_models.model_dir(source))
  else:
    if not pathlib.Path(source).is_dir():
      raise FileNotFoundError(f"FR model {spec!r}: no converted FR directory at {source}; convert a checkpoint with "
                              "`python -m tools.convert_torch_weights`, or use bundled:mobilefacenet or shared:NAME "
                              f"({', '.join(real_models.REAL_MODELS)})")
    recogniser = load(source)
  if fold_batchnorm:
    recogniser = recogniser.fold_batchnorm()
  return Surrogate(spec=spec, recogniser=recogniser, apply=views.view_apply(recogniser, input_crop, mirror == "flip"),
                   view=views.view_name(input_crop, image_size) if image_size else None)


def surrogate_arch(spec: str) -> str | None:
  """The architecture a surrogate spec's card names (`bundled:NAME` or a converted directory), or None when the
  directory is absent."""
  source = spec.partition("@")[0]
  folder = bundled_dir(source.removeprefix("bundled:")) if source.startswith("bundled:") else pathlib.Path(source)
  if not (folder / convert.CARD_FILE).is_file():
    return None
  return convert.read_card(folder)["arch"]


def abstract_surrogate(spec: str, arch: str, input_crop: str = "none", image_size: int | None = None,
                       fold_batchnorm: bool = False) -> Surrogate:
  """`load_surrogate(spec, ...)` with abstract variables of architecture `arch` (shapes and dtypes, no weights): the
  same `apply` (view, crop, folded BatchNorms) for compiling the attack ahead of time (`erasablemask compile`)."""
  views.check_input_crop(input_crop)
  mirror = spec.partition("@")[2]
  if mirror not in VIEWS:
    raise ValueError(f"FR model {spec!r}: unknown view {mirror!r}; use one of {[v for v in VIEWS if v]} or none")
  recogniser = from_abstract(arch)
  if fold_batchnorm:
    recogniser = recogniser.fold_batchnorm()
  return Surrogate(spec=spec, recogniser=recogniser, apply=views.view_apply(recogniser, input_crop, mirror == "flip"),
                   view=views.view_name(input_crop, image_size) if image_size else None)


def target_embeddings(surrogates: Sequence[Surrogate], target_images: jax.Array) -> list[jax.Array]:
  """Each surrogate's target `t = (1/M) sum_j f(x_t_j)`, the mean of the M target images' unit embeddings.

  It is deliberately not normalised: for a unit embedding `e`, `e @ t = (1/M) sum_j cos(e, f(x_t_j))`, exactly the
  mean of the per-target-image cosines (`metrics.recognition.target_cosine`), which is what the attack maximises and
  what the reports compare with the single-pair thresholds. (With one target image it is that image's embedding.)
  """
  return [jnp.mean(s.embed(target_images), axis=0) for s in surrogates]
