"""LPIPS in Flax against a PyTorch reference written here (random weights, same inputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import lpips

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.torch


def _torch_features(net):
  """torchvision's alexnet/vgg16 `features` stacks, written out (no torchvision here)."""
  if net == "alex":
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)), (2, 5, 8, 10, 12)
  layers, cin = [], 3
  for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
      cin = v
  return nn.Sequential(*layers), (4, 9, 16, 23, 30)


class TorchLPIPS(nn.Module):
  """The lpips v0.1 forward: scaling layer, slices, normalize_tensor, (dropout +) 1x1 heads, spatial average."""

  def __init__(self, net):
    super().__init__()
    self.features, self.ends = _torch_features(net)
    chans = lpips.STAGE_CHANNELS[net]
    for k, c in enumerate(chans):
      setattr(self, f"lin{k}", nn.Module())
      getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
    self.register_buffer("shift", torch.tensor(lpips.SHIFT)[None, :, None, None])
    self.register_buffer("scale", torch.tensor(lpips.SCALE)[None, :, None, None])

  def feats(self, x):
    x = (x - self.shift) / self.scale
    out, start = [], 0
    for end in self.ends:
      for i in range(start, end):
        x = self.features[i](x)
      start = end
      out.append(x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + 1e-10))
    return out

  def forward(self, x0, x1):
    res = [getattr(self, f"lin{k}").model((a - b)**2).mean([2, 3], keepdim=True)
           for k, (a, b) in enumerate(zip(self.feats(x0), self.feats(x1)))]
    return sum(res)[:, 0, 0, 0]


def _random_torch_lpips(net, seed=0):
  torch.manual_seed(seed)
  model = TorchLPIPS(net).eval()
  with torch.no_grad():
    for k in range(5):  # lpips heads are non-negative
      w = getattr(model, f"lin{k}").model[1].weight
      w.copy_(torch.rand_like(w) * 0.1)
    for m in model.features:
      if isinstance(m, nn.Conv2d):
        m.bias.normal_(0, 0.05)
  return model


def _split_state_dict(model):
  """Two files as users have them: the torchvision trunk (`features.*` + a classifier) and the lpips heads."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  trunk = {k: v for k, v in sd.items() if k.startswith("features.")}
  trunk["classifier.1.weight"] = np.zeros((4, 4), np.float32)
  heads = {k: v for k, v in sd.items() if k.startswith("lin")}
  return trunk, heads


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 48)])
def test_lpips_matches_torch_reference(net, size):
  model = _random_torch_lpips(net)
  trunk, heads = _split_state_dict(model)
  variables = lpips.variables_from_torch(net, trunk, heads)
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
  t0, t1 = (torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for v in (x0, x1))
  with torch.no_grad():
    ref_feats = [f.numpy().transpose(0, 2, 3, 1) for f in model.feats(t0)]
    ref_dist = model(t0, t1).numpy()

  module = lpips.LPIPS(net)
  feats = jax.jit(lambda v, x: module.apply(v, x, method=lpips.LPIPS.features))(variables, x0)
  for got, want in zip(feats, ref_feats):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  dist = lpips.LPIPSMetric(net, variables, batch_size=2)(x0, x1)  # two batches, exercises the batching
  np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-6)
  assert np.all(dist > 0)
  np.testing.assert_allclose(lpips.LPIPSMetric(net, variables)(x0, x0), 0.0, atol=1e-7)


def test_full_lpips_state_dict_spelling_and_export_roundtrip():
  model = _random_torch_lpips("alex", seed=3)
  trunk, heads = _split_state_dict(model)
  slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # lpips' own `net.sliceS.N` naming keeps the torchvision index N
  full = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v for k, v in trunk.items()
          if k.startswith("features.")}
  full.update(heads)
  full["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
  a = lpips.variables_from_torch("alex", full)
  b = lpips.variables_from_torch("alex", trunk, heads)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  exported = lpips.variables_to_torch(a)
  assert set(exported) == {k for k in trunk if k.startswith("features.")} | set(heads)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, trunk.get(k, heads.get(k)))


def test_conversion_names_unknown_and_missing_keys():
  model = _random_torch_lpips("alex")
  trunk, heads = _split_state_dict(model)
  with pytest.raises(ValueError, match=r"lin4/kernel"):
    lpips.variables_from_torch("alex", trunk, {k: v for k, v in heads.items() if not k.startswith("lin4")})
  with pytest.raises(ValueError, match=r"bogus\.weight"):
    lpips.variables_from_torch("alex", trunk, heads, {"bogus.weight": np.zeros(3)})
  with pytest.raises(ValueError, match=r"mis-shaped"):
    lpips.variables_from_torch("vgg", trunk, heads)


def test_no_weights_is_unavailable_not_a_number(without_metrics_extra):
  got = lpips.load_lpips("alex", None)  # no files given and the `metrics` extra absent
  assert isinstance(got, availability.Unavailable)
  assert "alexnet" in got.reason
  assert availability.format_metric(got).startswith("n/a")
  assert availability.to_json(got) == {"unavailable": got.reason}
  x = np.zeros((1, 64, 64, 3), np.float32)
  assert lpips.mean_lpips(got, x, x) is got


def test_load_lpips_from_files(tmp_path):
  model = _random_torch_lpips("alex")
  trunk, heads = _split_state_dict(model)
  torch.save({k: torch.from_numpy(v) for k, v in trunk.items()}, tmp_path / "alexnet.pth")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  safetensors_numpy.save_file(heads, str(tmp_path / "alex_heads.safetensors"))
  metric = lpips.load_lpips("alex", [tmp_path / "alexnet.pth", tmp_path / "alex_heads.safetensors"])
  x = jnp.zeros((1, 64, 64, 3))
  assert metric(x, x + 0.5).shape == (1,)
  assert lpips.mean_lpips(metric, x, x + 0.5) == pytest.approx(float(metric(x, x + 0.5)[0]))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lpips.load_lpips("alex", [tmp_path / "missing.pth"])


def test_registered_with_the_converter_and_model_dir_roundtrip(tmp_path):
  from erasablemask_jax import convert  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.metrics import archs  # pylint: disable=import-outside-toplevel,unused-import
  model = _random_torch_lpips("alex")
  trunk, heads = _split_state_dict(model)
  torch.save({k: torch.from_numpy(v) for k, v in {**trunk, **heads}.items()}, tmp_path / "lpips_alex_full.pth")
  out = convert.convert_checkpoint("lpips_alex", tmp_path / "lpips_alex_full.pth", tmp_path / "lpips_alex")
  metric = lpips.load_lpips("alex", out)
  direct = lpips.LPIPSMetric("alex", lpips.variables_from_torch("alex", trunk, heads))
  x0 = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  np.testing.assert_array_equal(metric(x0, -x0), direct(x0, -x0))
