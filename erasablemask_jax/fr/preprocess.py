"""Per-model preprocessing, from the project's [-1, 1] NHWC images to what each network was trained on.

For an input `x` in [-1, 1] (float32 NHWC, any size):

    x = central_crop(x, crop_fraction)                   # e.g. (1, 96/112): the 112x96 SphereFace crop of a
                                                         # 112x112 ArcFace-aligned face (8 px off each side)
    x = resize(x, input_size)                            # bilinear, antialiased when shrinking; skipped if equal
    x = ((x + 1) / 2 - mean) / std                       # mean/std on the [0, 1] pixel scale, per channel
    x = x[..., ::-1] if channel_order == "BGR"

Everything is `jax.numpy` so gradients flow from the embedding to the pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax.image_io import uint8_to_minus1_1  # noqa: F401  (defined in image_io; importable here as before)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MINUS1_1 = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}              # (p/255 - 0.5) / 0.5
FACENET_STANDARDISATION = {"mean": (0.5, 0.5, 0.5), "std": (128 / 255,) * 3}  # (p - 127.5) / 128


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a network wants its input.

  Attributes:
    input_size: `(H, W)` of the network input.
    mean: per-channel mean on the [0, 1] pixel scale.
    std: per-channel std on the [0, 1] pixel scale.
    crop_fraction: `(h, w)` fractions of the incoming image kept by a central crop before resizing.
    channel_order: `"RGB"` or `"BGR"` (the channel order the network expects).
  """
  input_size: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  crop_fraction: tuple[float, float] = (1.0, 1.0)
  channel_order: str = "RGB"

  @classmethod
  def from_card(cls, card: Mapping[str, Any]) -> "Preprocessing":
    p = card["preprocessing"]
    return cls(input_size=tuple(card["input_size"]), mean=tuple(p["mean"]), std=tuple(p["std"]),
               crop_fraction=tuple(p.get("crop_fraction", (1.0, 1.0))), channel_order=p.get("channel_order", "RGB"))

  def to_card(self) -> dict[str, Any]:
    return {"input_size": list(self.input_size),
            "preprocessing": {"mean": list(self.mean), "std": list(self.std),
                              "crop_fraction": list(self.crop_fraction), "channel_order": self.channel_order,
                              "input_range": "pixels/255 in [0, 1], then (x - mean) / std"}}


def central_crop(x: jnp.ndarray, fraction: tuple[float, float]) -> jnp.ndarray:
  """Keeps the central `round(H*fh) x round(W*fw)` window of NHWC `x` (static shapes)."""
  h, w = x.shape[1], x.shape[2]
  ch, cw = int(round(h * fraction[0])), int(round(w * fraction[1]))
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[:, top:top + ch, left:left + cw, :]


def preprocess(images: jnp.ndarray, prep: Preprocessing) -> jnp.ndarray:
  """[-1, 1] NHWC images of any size -> the network's normalised input `(N, *input_size, 3)`."""
  x = jnp.asarray(images, jnp.float32)
  if tuple(prep.crop_fraction) != (1.0, 1.0):
    x = central_crop(x, prep.crop_fraction)
  h, w = prep.input_size
  if (x.shape[1], x.shape[2]) != (h, w):
    x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="linear", antialias=True)
  mean = np.asarray(prep.mean, np.float32)
  std = np.asarray(prep.std, np.float32)
  x = ((x + 1.0) * 0.5 - mean) / std
  if prep.channel_order == "BGR":
    x = x[..., ::-1]
  return x


