"""FID: the pytorch-fid InceptionV3 pool3 features (2048-d) in Flax, and the Frechet distance.

The network is pytorch-fid's `fid_inception_v3()` (the TF "pt_inception-2015-12-05" graph): torchvision's Inception3
with `FIDInceptionA` (Mixed_5b-d), `FIDInceptionC` (Mixed_6b-e), `FIDInceptionE_1/_2` (Mixed_7b/c), whose average pools
exclude the zero padding and whose Mixed_7c pool branch is a max pool. Every conv is conv(no bias) + BatchNorm(eps 1e-3)
+ ReLU (`BasicConv2d`). Parameter paths copy the PyTorch module names, so the rename table is a handful of suffix rules.
Weights: `pt_inception-2015-12-05-6726825d.pth` (the `fc.*` classifier is ignored).

Inputs are float NHWC in [-1, 1] (pytorch-fid maps [0, 1] to [-1, 1] itself; we are already there). With
`resize_input` the images are first resized to 299 x 299, bilinear with half-pixel centres and no antialiasing, as
`F.interpolate(mode="bilinear", align_corners=False)`. Without it any size >= 75 x 75 works.

Frechet distance between Gaussians N(mu1, S1), N(mu2, S2):

  d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

and `tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A S2 A))` with `A = S1^{1/2}`: S1 S2 is similar to the symmetric PSD
matrix A S2 A, so only symmetric eigendecompositions are needed (no complex sqrtm, no ad hoc diagonal offset); float64,
round-off negative eigenvalues are clipped to 0.

FD-VGG16 ("FD-VGG16, not comparable to FID"): the same Frechet distance on other features, for when the Inception
weights are not at hand. The features are torchvision VGG16's relu5_3 (the LPIPS VGG trunk with the `metrics` extra's
weights, ImageNet-normalised input, images at their own size), averaged over space: 512-d. It is not FID (another
network, layer, dimension and resolution; no published value is comparable) and serves relative comparisons between
runs only, at equal image size and equal numbers of images: the estimate is biased upwards, more so for few images
(the covariance has rank < N, so below 513 images it is rank-deficient; two disjoint sets of the same faces already
score well above 0), so compare only values computed on the same number of images, and report that number.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erasablemask_jax import convert
from erasablemask_jax.convert import rules
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import batching
from erasablemask_jax.metrics import lpips

FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75


class BasicConv2d(nn.Module):
  """conv (no bias) + BatchNorm(eps=1e-3, running statistics) + ReLU, as torchvision's `BasicConv2d`."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride,) * 2, padding=((ph, ph), (pw, pw)),
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool3(x: jax.Array) -> jax.Array:
  # TF's average pool does not count the zero padding (pytorch-fid's "patch").
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d (`FIDInceptionA`): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision `InceptionB`): stride-2 reduction to 768 channels."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool3s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e (`FIDInceptionC`): factorised 7x7 branches with `channels_7x7` inner channels -> 768."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision `InceptionD`): stride-2 reduction to 1280 channels."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (`FIDInceptionE_1`, avg pool) / Mixed_7c (`FIDInceptionE_2`, max pool): -> 2048 channels."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool3(x)
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """[N, H, W, C] -> [N, size, size, C] like `F.interpolate(mode="bilinear", align_corners=False)` (no antialias)."""
  n, h, w, c = x.shape
  scale = jnp.asarray([size / h, size / w], jnp.float32)
  return jax.image.scale_and_translate(x, (n, size, size, c), (1, 2), scale, jnp.zeros(2, jnp.float32),
                                       method="linear", antialias=False)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's InceptionV3 up to pool3. x: float [N, H, W, 3] in [-1, 1] -> [N, 2048]."""
  resize_input: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool3s2(x)
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def _bn_conv_rules(prefix_t: str, prefix_f: str) -> tuple[rules.Rule, ...]:
  R = rules.Rule  # pylint: disable=invalid-name
  return (
      R(f"{prefix_t}.conv.weight", f"params/{prefix_f}/conv/kernel", "conv"),
      R(f"{prefix_t}.bn.weight", f"params/{prefix_f}/bn/scale"),
      R(f"{prefix_t}.bn.bias", f"params/{prefix_f}/bn/bias"),
      R(f"{prefix_t}.bn.running_mean", f"batch_stats/{prefix_f}/bn/mean"),
      R(f"{prefix_t}.bn.running_var", f"batch_stats/{prefix_f}/bn/var"),
  )


# Stem convs are `{m}.conv...`, block convs `{m}.{b}.conv...`; the Flax paths copy the names.
RENAME_RULES = _bn_conv_rules("{m}", "{m}") + _bn_conv_rules("{m}.{b}", "{m}/{b}")
IGNORED_KEYS = (r".*\.num_batches_tracked", r"fc\.(weight|bias)", r"AuxLogits\..*")


def abstract_variables() -> Any:
  """Shapes of the FIDInceptionV3 variables (no compute)."""
  x = jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3(resize_input=False).init, jax.random.key(0), x)


def variables_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Flax variables (`params`, `batch_stats`) from the pytorch-fid state_dict (pt_inception-2015-12-05)."""
  return rules.torch_to_flax(state_dict, RENAME_RULES, IGNORED_KEYS, abstract_variables(), "FID InceptionV3")


def variables_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The reverse (without `fc.*` and `num_batches_tracked`, which pytorch-fid's pool3 path never uses)."""
  return rules.flax_to_torch(variables, RENAME_RULES, "FID InceptionV3")


class InceptionFeatures:
  """A loaded FID network: `extractor(x)` -> numpy float64 [N, 2048] pool3 features, jitted, in batches."""

  def __init__(self, variables: Mapping[str, Any], batch_size: int = 32, resize_input: bool = True):
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.batch_size = batch_size
    self._apply = jax.jit(batching.full_precision(FIDInceptionV3(resize_input=resize_input).apply))

  def __call__(self, x: jax.Array) -> np.ndarray:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"FID features need an NHWC RGB batch, got shape {x.shape}")
    return batching.map_in_batches(lambda a: self._apply(self.variables, a), self.batch_size, x).astype(np.float64)


def load_inception(weights: str | pathlib.Path | None) -> InceptionFeatures | availability.Unavailable:
  """Loads the FID network from a checkpoint file, or says why it cannot.

  Args:
    weights: `pt_inception-2015-12-05-6726825d.pth` (needs torch), a `.safetensors` copy, or a model directory
      written by the converter (`--arch fid_inception`). None: none.

  Returns:
    The feature extractor, or `Unavailable` with the reason.
  """
  if not weights:
    return availability.Unavailable(
        "no FID Inception weights given: supply pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  if pathlib.Path(weights).is_dir():
    variables, _ = convert.read_model_dir(weights)
    return InceptionFeatures(variables)
  return InceptionFeatures(variables_from_torch(convert.read_state_dict(weights)))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (ddof=1, as pytorch-fid) of [N, D] features, float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"FID needs at least 2 feature vectors [N, D], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) * 0.5)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring for the method).

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances (symmetric PSD up to round-off).

  Returns:
    `||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 sum_i sqrt(lambda_i(A sigma2 A))`, `A = sigma1^{1/2}`.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"inconsistent statistics: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
  a = _psd_sqrt(sigma1)
  m = a @ sigma2 @ a
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) * 0.5), 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets [N1, D], [N2, D] (float64).

  With centred features X1, X2 and c = (N1 - 1)(N2 - 1), S1 S2 = X1^T (X1 X2^T) X2 / c has the same non-zero
  eigenvalues as K K^T / c with K = X1 X2^T [N1, N2], so `tr((S1 S2)^{1/2}) = sum_i sigma_i(K) / sqrt(c)` (the nuclear
  norm of K). That is exact and far cheaper than D x D eigendecompositions whenever N1 * N2 is small against D^2
  (e.g. a few hundred images against D = 2048); otherwise the statistics route (`frechet_distance`) is taken.
  """
  f1, f2 = (np.asarray(f, np.float64) for f in (features1, features2))
  for f in (f1, f2):
    if f.ndim != 2 or f.shape[0] < 2:
      raise ValueError(f"FID needs at least 2 feature vectors [N, D], got shape {f.shape}")
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f"feature sizes differ: {f1.shape} vs {f2.shape}")
  (n1, d), n2 = f1.shape, f2.shape[0]
  if n1 * n2 > d * d:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
  mu1, mu2 = f1.mean(0), f2.mean(0)
  x1, x2 = f1 - mu1, f2 - mu2
  c = (n1 - 1) * (n2 - 1)
  tr_covmean = np.sum(np.linalg.svd(x1 @ x2.T, compute_uv=False)) / np.sqrt(c)
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(x1 * x1) / (n1 - 1) + np.sum(x2 * x2) / (n2 - 1) - 2.0 * tr_covmean)


def fid(images1: jax.Array, images2: jax.Array,
        extractor: InceptionFeatures | availability.Unavailable) -> availability.MetricValue:
  """FID between two image sets (float NHWC in [-1, 1]); `Unavailable` passes through when there are no weights.

  FID is biased upwards for small sets (the covariance is rank-deficient below 2048 images); report the set sizes.
  """
  if isinstance(extractor, availability.Unavailable):
    return extractor
  return fid_from_features(extractor(images1), extractor(images2))


FD_VGG16_LABEL = "FD-VGG16, not comparable to FID"
VGG16_FEATURE_DIM = 512


class VGG16Features:
  """relu5_3 of torchvision VGG16 averaged over space (module docstring): `extractor(x)` -> numpy float64 [N, 512]."""

  def __init__(self, variables: Mapping[str, Any], batch_size: int = 8):
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.batch_size = batch_size
    module = lpips.LPIPS("vgg")
    self._apply = jax.jit(batching.full_precision(
        lambda v, x: jnp.mean(module.apply(v, x, method=lpips.LPIPS.stages)[-1], axis=(1, 2))))

  def __call__(self, x: jax.Array) -> np.ndarray:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"{FD_VGG16_LABEL} features need an NHWC RGB batch, got shape {x.shape}")
    problem = lpips.size_problem("vgg", x.shape)
    if problem:
      raise ValueError(problem)
    return batching.map_in_batches(lambda a: self._apply(self.variables, a), self.batch_size, x).astype(np.float64)


def load_vgg16_features() -> VGG16Features | availability.Unavailable:
  """The FD-VGG16 feature extractor with the `metrics` extra's VGG16 weights, or `Unavailable` saying what to install."""
  try:
    return VGG16Features(lpips.pretrained_variables("vgg"))
  except lpips.PretrainedWeightsUnavailable as e:
    return availability.Unavailable(f"no VGG16 weights for {FD_VGG16_LABEL}: {e}")


def fd_vgg16(images1: jax.Array, images2: jax.Array,
             extractor: VGG16Features | availability.Unavailable) -> availability.MetricValue:
  """FD-VGG16 between two image sets (float NHWC in [-1, 1], the same size): NOT FID, see the module docstring.

  Only for relative comparisons between runs scored on the same number of images at the same size (the value is biased
  upwards and depends on both). `Unavailable` passes through, and is returned for fewer than 2 images per set or
  images smaller than 16 px.
  """
  if isinstance(extractor, availability.Unavailable):
    return extractor
  if min(len(images1), len(images2)) < 2:
    return availability.Unavailable(f"{FD_VGG16_LABEL} needs at least 2 images per set")
  problem = lpips.size_problem("vgg", images1.shape) or lpips.size_problem("vgg", images2.shape)
  if problem:
    return availability.Unavailable(problem)
  return fid_from_features(extractor(images1), extractor(images2))
