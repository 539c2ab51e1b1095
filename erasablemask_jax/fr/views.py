"""Views: how a face image reaches a face-recognition network, and the name its calibrated thresholds are stored under.

A cosine threshold belongs to the function that produced the embeddings, so to the view as well as the weights. Two
kinds of view:

- `arcface112` (`ARCFACE112`): ArcFace-aligned crops given to the network as they are (its own preprocessing
  resizes them to its input), the way FR models are usually calibrated;
- `"{input_crop}@{image_size}"`, e.g. `loose_to_arcface@128` or `none@256`: what training and evaluation score, the
  generator's `image_size` square output through `fr.input_crop`:

      none:              x -> resize(x, input_size)                           (the paper: the whole image)
      loose_to_arcface:  x -> resize(x[box], input_size), box = the ArcFace 112 template's square inside the
                         loose crop of our aligner (`arcface_box_in_loose`), one antialiased resampling

  then the network's normalisation (`fr.preprocess`). A mirrored surrogate (`DIR@flip`) scores mirrored faces
  through the same view; its pairs are mirrored pairs of the same faces, and it uses the view's thresholds.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from erasablemask_jax.align import warp

ARCFACE112 = "arcface112"
INPUT_CROPS = ("none", "loose_to_arcface")
_RUN_VIEW = re.compile(r"(?P<crop>[a-z_]+)@(?P<size>[0-9]+)")


def view_name(input_crop: str, image_size: int) -> str:
  """The name of a run's view: `"{input_crop}@{image_size}"` (e.g. `loose_to_arcface@128`)."""
  check_input_crop(input_crop)
  if int(image_size) < 1:
    raise ValueError(f"image size {image_size} is not a positive number of pixels")
  return f"{input_crop}@{int(image_size)}"


def parse_view(name: str) -> tuple[str, int] | None:
  """`"loose_to_arcface@128"` -> `("loose_to_arcface", 128)`; `"arcface112"` -> None (the plain aligned crops)."""
  if name == ARCFACE112:
    return None
  match = _RUN_VIEW.fullmatch(name)
  if match is None or match["crop"] not in INPUT_CROPS or int(match["size"]) < 1:
    raise ValueError(f"view {name!r}: write {ARCFACE112!r} or INPUT_CROP@SIZE with INPUT_CROP one of {INPUT_CROPS} "
                     "(e.g. loose_to_arcface@128, SIZE >= 1)")
  return match["crop"], int(match["size"])


def check_input_crop(input_crop: str) -> None:
  if input_crop not in INPUT_CROPS:
    raise ValueError(f"fr.input_crop={input_crop!r}; choose one of {INPUT_CROPS}")


def arcface_box_in_loose() -> tuple[float, float, float]:
  """`(top, left, side)` of the ArcFace 112 template's square inside a loose crop, as fractions of the side.

  The loose template is the ArcFace one scaled about the origin and shifted (`erasablemask_jax.align.warp`), so the
  similarity between the two unit templates maps the unit square to the box.
  """
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


def view_apply(recogniser: Any, input_crop: str, flip: bool = False) -> Callable[[Any, jax.Array], jax.Array]:
  """A pure `apply(variables, x_in_minus1_1) -> unit embeddings` of `recogniser` seen through `input_crop`
  (and mirrored with `flip`); the recogniser's own `apply_fn` when there is nothing to add."""
  check_input_crop(input_crop)
  box = arcface_box_in_loose() if input_crop == "loose_to_arcface" else None
  if box is None and not flip:
    return recogniser.apply_fn
  return functools.partial(_view, recogniser.apply_fn, flip, box, recogniser.input_size if box is not None else None)
