"""FID InceptionV3 in Flax against a PyTorch reference written here; the Frechet distance against scipy's sqrtm."""


import jax
import numpy as np
import pytest
import scipy.linalg

from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import fid

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class BasicConv2d(nn.Module):

  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for k in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{k}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for k in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{k}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  """pytorch-fid `InceptionV3([3])` on `fid_inception_v3()`, with the 1008-way fc the checkpoint carries."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x, resize_input):
    if resize_input:
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]


@pytest.fixture(scope="module")
def reference():
  """A randomly initialised reference net and its converted Flax variables.

  A deep random net in inference mode maps every input to nearly the same features, which would make FID ~0 and the
  comparison vacuous. So the BatchNorm running statistics are set from a calibration batch (cumulative averages in
  train mode), which keeps each layer's activations varying across images, and the affine terms are randomised.
  """
  torch.manual_seed(0)
  model = TorchFIDInception()
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.momentum = None  # cumulative average over the calibration forward
      m.weight.uniform_(0.5, 1.5)
      m.bias.normal_(0, 0.1)
    model.train()
    model(torch.rand(8, 3, 80, 80) * 2 - 1, False)
  model.eval()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(k.endswith("num_batches_tracked") for k in sd) and "fc.weight" in sd
  return model, fid.variables_from_torch(sd)


def _torch_features(model, x, resize_input):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), resize_input).numpy()


def _assert_features_close(got, want):
  assert got.shape == want.shape and got.shape[1] == fid.FEATURE_DIM
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-4)


def test_inception_features_and_fid_match_torch_at_small_size(reference):
  model, variables = reference
  rng = np.random.default_rng(0)
  x1 = rng.uniform(-1, 1, (6, 80, 80, 3)).astype(np.float32)
  x2 = np.clip(x1 * 0.7 + rng.normal(0, 0.3, x1.shape), -1, 1).astype(np.float32)
  extractor = fid.InceptionFeatures(variables, batch_size=4, resize_input=False)
  f1, f2 = extractor(x1), extractor(x2)
  r1, r2 = _torch_features(model, x1, False), _torch_features(model, x2, False)
  _assert_features_close(f1, r1)
  _assert_features_close(f2, r2)
  # FID of the Flax pipeline vs FID of the torch pipeline, both through the same Frechet formula: the features'
  # agreement carries over (the formula itself is checked against scipy's sqrtm below).
  got, want = fid.fid_from_features(f1, f2), fid.fid_from_features(r1, r2)
  # Not vacuous: the distance is a sizeable fraction of the features' own spread.
  assert want > 0.05 * fid.fid_from_features(r1, np.zeros_like(r1) + r1.mean(0) + 1.0)
  assert got == pytest.approx(want, rel=1e-3, abs=0.0)


@pytest.mark.slow
def test_inception_features_match_torch_at_299_with_resize(reference):
  model, variables = reference
  x = np.random.default_rng(1).uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)  # resized up to 299 first
  _assert_features_close(fid.InceptionFeatures(variables)(x), _torch_features(model, x, True))


def test_resize_matches_torch_interpolate_up_and_down():
  x = np.random.default_rng(2).normal(size=(2, 37, 53, 3)).astype(np.float32)
  for size in (71, 19):
    want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=(size, size), mode="bilinear",
                         align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(jax.jit(fid.resize_bilinear, static_argnums=1)(x, size)), want, atol=5e-5)  # float32 round-off in the source coordinates


def _scipy_frechet(mu1, s1, mu2, s2):
  """pytorch-fid's `calculate_frechet_distance` (sqrtm of the product)."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  d = mu1 - mu2
  return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_against_scipy_sqrtm():
  rng = np.random.default_rng(3)
  d = 64
  a = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) * 0.3
  b = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  mu1, mu2 = a.mean(0), b.mean(0)
  want = _scipy_frechet(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
  assert fid.fid_from_features(a, b) == pytest.approx(want, rel=1e-6)  # N1 * N2 > D^2: statistics route
  # Few samples (N1 * N2 < D^2): the sample-space (nuclear norm) route equals the D x D route.
  a_few, b_few = a[:6, :], b[:5, :]
  by_stats = fid.frechet_distance(a_few.mean(0), np.cov(a_few, rowvar=False), b_few.mean(0), np.cov(b_few, rowvar=False))
  assert fid.fid_from_features(a_few, b_few) == pytest.approx(by_stats, rel=1e-6)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))
  # Gaussians with diagonal covariances have the closed form sum (sqrt(v1) - sqrt(v2))^2 + ||mu1 - mu2||^2.
  v1, v2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  closed = np.sum((np.sqrt(v1) - np.sqrt(v2))**2) + np.sum((mu1 - mu2)**2)
  assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)


def test_frechet_distance_is_finite_for_rank_deficient_covariances():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(5, 300)), rng.normal(size=(5, 300)) + 0.1
  value = fid.fid_from_features(a, b)
  assert np.isfinite(value) and value > 0
  with pytest.raises(ValueError, match="at least 2"):
    fid.fid_from_features(a[:1], b)


def test_conversion_is_strict_and_reversible(reference):
  model, variables = reference
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  exported = fid.variables_to_torch(variables)
  assert set(exported) == {k for k in sd if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, sd[k])
  from erasablemask_jax import convert  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.metrics import archs  # pylint: disable=import-outside-toplevel,unused-import
  via_registry = convert.convert_state_dict("fid_inception", sd)
  jax.tree_util.tree_map(np.testing.assert_array_equal, via_registry, variables)
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  with pytest.raises(ValueError, match="Mixed_7c/branch_pool/bn/var"):
    fid.variables_from_torch(sd)


def test_no_weights_is_unavailable():
  extractor = fid.load_inception(None)
  assert isinstance(extractor, availability.Unavailable)
  x = np.zeros((2, 80, 80, 3), np.float32)
  assert fid.fid(x, x, extractor) is extractor
  assert "pt_inception" in availability.format_metric(extractor)
