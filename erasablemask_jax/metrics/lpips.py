"""LPIPS (Zhang et al. 2018, v0.1) in Flax: AlexNet / VGG16 feature trunks, unit-normalised differences, linear heads.

For two images x0, x1 (float NHWC in [-1, 1]):

  s(x)        = (x - shift) / scale                      # the "scaling layer", per channel
  f_l(x)      = relu output of trunk stage l, l = 1..5   # AlexNet relu1..5 / VGG16 relu1_2, 2_2, 3_3, 4_3, 5_3
  n_l(x)      = f_l / (sqrt(sum_c f_l^2) + 1e-10)        # unit length over channels, per pixel
  d(x0, x1)   = sum_l mean_{h,w} sum_c w_{l,c} (n_l(s(x0)) - n_l(s(x1)))^2

with `shift = [-.030, -.088, -.188]`, `scale = [.458, .448, .450]` and `w_l` the non-negative 1x1 conv weights of the
`lpips` package's v0.1 heads. Weights: the torchvision `alexnet` / `vgg16` checkpoints (keys `features.N.weight|bias`;
`classifier.*` is ignored) plus the `lpips` package's `weights/v0.1/{alex,vgg}.pth` (keys `linK.model.1.weight`).
A full `lpips.LPIPS` state_dict (`net.sliceS.N.*`, `lin*`, `scaling_layer.*`) is accepted as well.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax import convert
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import batching
from erasablemask_jax.metrics import torch_layout

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


@dataclasses.dataclass(frozen=True)
class TrunkSpec:
  """A torchvision `features` stack: convs (index, out channels, kernel, stride, padding), pools and taps.

  Every conv is followed by ReLU; "tap" records the current activation as an LPIPS stage; "pool" is max pooling.
  """
  layers: tuple[tuple[Any, ...], ...]
  pool_window: int
  pool_stride: int


def _vgg16_layers() -> tuple[tuple[Any, ...], ...]:
  layers, index = [], 0
  for stage, (channels, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
    if stage:
      layers.append(("pool",))
      index += 1
    for _ in range(n):
      layers.append(("conv", index, channels, 3, 1, 1))
      index += 2  # conv, relu
    layers.append(("tap",))
  return tuple(layers)


TRUNKS = {
    "alex": TrunkSpec(
        layers=(("conv", 0, 64, 11, 4, 2), ("tap",), ("pool",),
                ("conv", 3, 192, 5, 1, 2), ("tap",), ("pool",),
                ("conv", 6, 384, 3, 1, 1), ("tap",),
                ("conv", 8, 256, 3, 1, 1), ("tap",),
                ("conv", 10, 256, 3, 1, 1), ("tap",)),
        pool_window=3, pool_stride=2),
    "vgg": TrunkSpec(layers=_vgg16_layers(), pool_window=2, pool_stride=2),
}
STAGE_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class FeatureTrunk(nn.Module):
  """torchvision `alexnet().features` / `vgg16().features` up to the last LPIPS tap; returns the 5 tapped maps."""
  net: str

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    spec = TRUNKS[self.net]
    taps = []
    for op in spec.layers:
      if op[0] == "conv":
        _, index, channels, k, s, p = op
        x = nn.Conv(channels, (k, k), strides=(s, s), padding=((p, p), (p, p)), name=f"features_{index}")(x)
        x = nn.relu(x)
      elif op[0] == "pool":
        x = nn.max_pool(x, (spec.pool_window,) * 2, strides=(spec.pool_stride,) * 2, padding="VALID")
      else:
        taps.append(x)
    return taps


def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """`f / (||f||_2 over channels + eps)` per pixel, as `lpips.normalize_tensor`."""
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance. `__call__(x0, x1)` -> [N]; `features(x)` -> the 5 unit-normalised stage maps."""
  net: str = "alex"

  def setup(self):
    if self.net not in TRUNKS:
      raise ValueError(f"LPIPS net must be one of {sorted(TRUNKS)}, got {self.net!r}")
    self.trunk = FeatureTrunk(self.net, name="net")
    self.heads = [nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}") for k in range(5)]

  def features(self, x: jax.Array) -> list[jax.Array]:
    """Scaling layer, trunk, unit-normalisation. x: float [N, H, W, 3] in [-1, 1]."""
    x = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
    return [normalize_channels(f) for f in self.trunk(x)]

  def __call__(self, x0: jax.Array, x1: jax.Array, per_layer: bool = False):
    """LPIPS distance per image pair.

    Args:
      x0: float [N, H, W, 3] in [-1, 1].
      x1: float [N, H, W, 3] in [-1, 1].
      per_layer: also return the 5 per-stage terms.

    Returns:
      [N] distances (and a list of 5 [N] stage terms when `per_layer`).
    """
    terms = [jnp.mean(head(jnp.square(a - b)), axis=(1, 2, 3))
             for head, a, b in zip(self.heads, self.features(x0), self.features(x1))]
    total = sum(terms)
    return (total, terms) if per_layer else total


# PyTorch <-> Flax rename table. torchvision trunk, lpips heads, and the alternative full-LPIPS spelling.
RENAME_RULES = (
    torch_layout.Rule("features.{i}.weight", "params/net/features_{i}/kernel", "conv"),
    torch_layout.Rule("features.{i}.bias", "params/net/features_{i}/bias"),
    torch_layout.Rule("lin{k}.model.1.weight", "params/lin{k}/kernel", "conv"),
    torch_layout.Rule("net.slice{s}.{i}.weight", "params/net/features_{i}/kernel", "conv", reverse=False),
    torch_layout.Rule("net.slice{s}.{i}.bias", "params/net/features_{i}/bias", reverse=False),
)
IGNORED_KEYS = (r"classifier\..*", r"scaling_layer\.(shift|scale)")


def abstract_variables(net: str) -> Any:
  """Shapes of the LPIPS variables (no compute)."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(LPIPS(net).init, jax.random.key(0), x, x)


def variables_from_torch(net: str, *state_dicts: Mapping[str, Any]) -> dict[str, Any]:
  """Flax LPIPS variables from PyTorch state_dicts (trunk and heads, in any order; merged).

  Args:
    net: "alex" or "vgg".
    *state_dicts: e.g. torchvision `alexnet` weights and `lpips/weights/v0.1/alex.pth`.

  Returns:
    `{"params": ...}` for `LPIPS(net).apply`.
  """
  merged: dict[str, Any] = {}
  for sd in state_dicts:
    merged.update(sd)
  return torch_layout.torch_to_flax(merged, RENAME_RULES, IGNORED_KEYS, abstract_variables(net), f"LPIPS({net})")


def variables_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The reverse: `features.N.*` (torchvision) and `linK.model.1.weight` (lpips heads) numpy arrays."""
  return torch_layout.flax_to_torch(variables, RENAME_RULES, "LPIPS")


class LPIPSMetric:
  """A loaded LPIPS network: `metric(x0, x1)` -> numpy [N] distances, jitted, evaluated in batches."""

  def __init__(self, net: str, variables: Mapping[str, Any], batch_size: int = 32):
    self.net = net
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.batch_size = batch_size
    self._apply = jax.jit(batching.full_precision(LPIPS(net).apply))

  def __call__(self, x0: jax.Array, x1: jax.Array) -> np.ndarray:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two NHWC RGB batches of the same shape, got {x0.shape} and {x1.shape}")
    return batching.map_in_batches(lambda a, b: self._apply(self.variables, a, b), self.batch_size, x0, x1)


def load_lpips(net: str, weights: Sequence[str | pathlib.Path] | str | pathlib.Path | None
               ) -> LPIPSMetric | availability.Unavailable:
  """Loads LPIPS from checkpoint files or a converted model directory, or says why it cannot.

  Args:
    net: "alex" or "vgg".
    weights: a model directory written by the converter (`--arch lpips_alex|lpips_vgg`), or checkpoint files
      (`.pth` needs torch, `.safetensors` does not) holding the trunk and the heads together, e.g.
      [alexnet-owt-7be5be79.pth, lpips/weights/v0.1/alex.pth] or one full `lpips.LPIPS` state_dict. None/empty: none.

  Returns:
    The metric, or `Unavailable` with the reason when no weights were given.
  """
  if not weights:
    return availability.Unavailable(
        f"no LPIPS({net}) weights given: supply the torchvision {'alexnet' if net == 'alex' else 'vgg16'} checkpoint "
        f"and the lpips v0.1 '{net}.pth' heads")
  if isinstance(weights, (str, pathlib.Path)):
    if pathlib.Path(weights).is_dir():
      variables, _ = convert.read_model_dir(weights)
      return LPIPSMetric(net, variables)
    weights = [weights]
  sds = [convert.read_state_dict(p) for p in weights]
  return LPIPSMetric(net, variables_from_torch(net, *sds))


def mean_lpips(metric: LPIPSMetric | availability.Unavailable, x0: jax.Array,
               x1: jax.Array) -> availability.MetricValue:
  """Mean LPIPS over the batch; `Unavailable` passes through when there are no weights."""
  if isinstance(metric, availability.Unavailable):
    return metric
  return float(np.mean(metric(x0, x1)))
