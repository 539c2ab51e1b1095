"""The white-box surrogates of the attack and the target identity's embeddings.

A surrogate spec is a converted FR directory (`tools.convert_torch_weights`) or `bundled:NAME`, optionally with a view
suffix: `@flip` scores the mirrored image. A mirrored view of one network is a different function of `x_adv` and lets
the demo run the meta-auxiliary attack (which needs K >= 2 surrogates) with the single bundled network; real runs list
different networks.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax import fr

VIEWS = ("", "flip")
INPUT_CROPS = ("none", "loose_to_arcface")


def arcface_box_in_loose() -> tuple[float, float, float]:
  """`(top, left, side)` of the ArcFace 112 template's square inside a loose crop, as fractions of the side.

  The loose template is the ArcFace one scaled about the origin and shifted (`erasablemask_jax.align.warp`), so the
  similarity between the two unit templates maps the unit square to the box.
  """
  from erasablemask_jax.align import warp

  m = warp.similarity_transform(warp.template("arcface", 1), warp.template("loose", 1))
  return float(m[1, 2]), float(m[0, 2]), float(m[0, 0])


def crop_to_box(x: jax.Array, box: tuple[float, float, float], out_size: tuple[int, int]) -> jax.Array:
  """Resamples the square `box = (top, left, side)` (fractions of the image side) of NHWC `x` to `out_size`,
  antialiased and differentiable (one `jax.image.scale_and_translate`)."""
  top, left, side = box
  h, w = x.shape[1], x.shape[2]
  scale = jnp.array([out_size[0] / (side * h), out_size[1] / (side * w)], jnp.float32)
  translation = -jnp.array([top * h, left * w], jnp.float32) * scale
  return jax.image.scale_and_translate(x, (x.shape[0], *out_size, x.shape[3]), (1, 2), scale, translation,
                                       method="linear", antialias=True)


def _view(apply_fn, flip: bool, box, out_size, variables, x):
  if box is not None:
    x = crop_to_box(x, box, out_size)
  if flip:
    x = x[:, :, ::-1, :]
  return apply_fn(variables, x)


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """A face-recognition network as the attack sees it: a pure `apply(variables, x_in_minus1_1) -> embeddings`."""

  spec: str
  recogniser: fr.Recogniser
  apply: Callable[[Any, jax.Array], jax.Array]

  @property
  def variables(self):
    return self.recogniser.variables

  def embed(self, images_minus1_1: jax.Array) -> jax.Array:
    return jax.jit(self.apply)(self.variables, images_minus1_1)


def load_surrogate(spec: str, input_crop: str = "none", image_size: int | None = None) -> Surrogate:
  """`DIR`, `bundled:NAME`, each optionally `@flip`; `input_crop` as `config.fr.input_crop`."""
  if input_crop not in INPUT_CROPS:
    raise ValueError(f"fr.input_crop={input_crop!r}; choose one of {INPUT_CROPS}")
  source, _, view = spec.partition("@")
  if view not in VIEWS:
    raise ValueError(f"surrogate {spec!r}: unknown view {view!r}; use one of {[v for v in VIEWS if v]} or none")
  if source.startswith("bundled:"):
    recogniser = fr.load_bundled(source.removeprefix("bundled:"))
  else:
    if not pathlib.Path(source).is_dir():
      raise FileNotFoundError(f"surrogate {spec!r}: no converted FR directory at {source}; convert a checkpoint with "
                              "`python -m tools.convert_torch_weights` or use bundled:mobilefacenet")
    recogniser = fr.load(source)
  box = arcface_box_in_loose() if input_crop == "loose_to_arcface" else None
  size = recogniser.input_size if box is not None else None
  if box is None and view == "":
    apply = recogniser.apply_fn
  else:
    apply = functools.partial(_view, recogniser.apply_fn, view == "flip", box, size)
  return Surrogate(spec=spec, recogniser=recogniser, apply=apply)


def target_embeddings(surrogates: Sequence[Surrogate], target_images: jax.Array) -> list[jax.Array]:
  """Each surrogate's target: the mean of the target images' normalised embeddings, so `e @ t` is the mean cosine."""
  return [jnp.mean(s.embed(target_images), axis=0) for s in surrogates]

