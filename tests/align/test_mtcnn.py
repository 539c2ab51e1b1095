"""MTCNN Flax modules against a PyTorch definition of facenet-pytorch's layout, with the real converted weights."""

from __future__ import annotations

import numpy as np
import pytest

from erasablemask_jax import convert
from erasablemask_jax.align import archs
from erasablemask_jax.align import mtcnn
from erasablemask_jax.align import weights as weights_lib

torch = pytest.importorskip("torch")
nn = torch.nn


def _torch_net(name):
  """The facenet-pytorch layer layout (conv/prelu/pool/dense), written out here as an independent reference."""

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      if name == "pnet":
        spec = [("conv1", 3, 10, 3), ("pool", 2, 2), ("conv2", 10, 16, 3), ("conv3", 16, 32, 3)]
        self.heads = {"conv4_1": (32, 2, "conv"), "conv4_2": (32, 4, "conv")}
      elif name == "rnet":
        spec = [("conv1", 3, 28, 3), ("pool", 3, 2), ("conv2", 28, 48, 3), ("pool", 3, 2), ("conv3", 48, 64, 2),
                ("dense4", 576, 128)]
        self.heads = {"dense5_1": (128, 2, "dense"), "dense5_2": (128, 4, "dense")}
      else:
        spec = [("conv1", 3, 32, 3), ("pool", 3, 2), ("conv2", 32, 64, 3), ("pool", 3, 2), ("conv3", 64, 64, 3),
                ("pool", 2, 2), ("conv4", 64, 128, 2), ("dense5", 1152, 256)]
        self.heads = {"dense6_1": (256, 2, "dense"), "dense6_2": (256, 4, "dense"), "dense6_3": (256, 10, "dense")}
      self.spec = spec
      for i, s in enumerate(spec):
        if s[0].startswith("conv"):
          setattr(self, s[0], nn.Conv2d(s[1], s[2], s[3]))
          setattr(self, "prelu" + s[0][4:], nn.PReLU(s[2]))
        elif s[0].startswith("dense"):
          setattr(self, s[0], nn.Linear(s[1], s[2]))
          setattr(self, "prelu" + s[0][5:], nn.PReLU(s[2]))
      for k, (i, o, kind) in self.heads.items():
        setattr(self, k, nn.Conv2d(i, o, 1) if kind == "conv" else nn.Linear(i, o))

    def forward(self, x):
      for s in self.spec:
        if s[0] == "pool":
          x = nn.functional.max_pool2d(x, s[1], s[2], ceil_mode=True)
        elif s[0].startswith("conv"):
          x = getattr(self, "prelu" + s[0][4:])(getattr(self, s[0])(x))
        else:
          x = x.permute(0, 3, 2, 1).contiguous().view(x.shape[0], -1)
          x = getattr(self, "prelu" + s[0][5:])(getattr(self, s[0])(x))
      outs = [getattr(self, k)(x) for k in self.heads]
      prob = torch.softmax(outs[0], dim=1)[:, 1]
      return [o.detach().numpy() for o in outs[1:]] + [prob.detach().numpy()]

  return Net()


@pytest.mark.torch
@pytest.mark.assets
@pytest.mark.parametrize("net,hw", [("pnet", (37, 50)), ("pnet", (12, 13)), ("rnet", (24, 24)), ("onet", (48, 48))])
def test_matches_torch_with_real_weights(assets_dir, net, hw):
  sd = torch.load(assets_dir / f"models/aux_detectors/facenet_pytorch_mtcnn_{net}.pt", map_location="cpu",
                  weights_only=True)
  ref = _torch_net(net)
  ref.load_state_dict(sd, strict=True)
  x = np.random.default_rng(0).uniform(-1, 1, (3, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  spec = convert.get_arch(archs.arch_name(net))
  variables = convert.strict_merge(archs.rename({k: v.numpy() for k, v in sd.items()}),
                                   convert.abstract_init(spec.build(), spec.input_shape))
  got = mtcnn.MODULES[net]().apply(variables, x)
  for g, w in zip(got, want):
    if w.ndim == 4:  # P-Net maps come back NCHW from torch.
      w = w.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(g), w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("hw,bucket", [((37, 50), (48, 64)), ((13, 12), (32, 32))])
def test_pnet_padding_mask_is_exact(hw, bucket):
  """P-Net on a zero-padded canvas with a validity mask equals P-Net on the unpadded image over the valid cells."""
  x = np.random.default_rng(1).uniform(-1, 1, (1, *hw, 3)).astype(np.float32)
  padded = np.zeros((1, *bucket, 3), np.float32)
  padded[:, :hw[0], :hw[1]] = x
  variables = weights_lib.load_bundled("pnet")
  reg, prob = mtcnn.PNet().apply(variables, x)
  valid = np.zeros((1, bucket[0] - 2, bucket[1] - 2), bool)
  valid[:, :hw[0] - 2, :hw[1] - 2] = True
  reg_p, prob_p = mtcnn.PNet().apply(variables, padded, valid)
  oh, ow = prob.shape[1:3]
  np.testing.assert_allclose(np.asarray(prob_p)[:, :oh, :ow], prob, atol=1e-6)
  np.testing.assert_allclose(np.asarray(reg_p)[:, :oh, :ow], reg, atol=1e-5)


@pytest.mark.torch
@pytest.mark.assets
def test_bundled_weights_equal_fresh_conversion(assets_dir, tmp_path):
  """The bundled model dirs equal a fresh `convert_checkpoint` of the shared checkpoints, read back by the reader."""
  from erasablemask_jax import convert
  for net in weights_lib.NETS:
    arch = f"mtcnn_{net}"
    assert arch in convert.list_archs()
    ckpt = assets_dir / f"models/aux_detectors/facenet_pytorch_mtcnn_{net}.pt"
    out = convert.convert_checkpoint(arch, ckpt, tmp_path / net)
    fresh, card = convert.read_model_dir(out)
    bundled_card = convert.read_card(weights_lib.bundled_dir(net))
    assert bundled_card["arch"] == card["arch"] == arch
    assert bundled_card["source"]["sha256"] == card["source"]["sha256"] == convert.sha256_file(ckpt)
    fresh = convert.flatten_variables(fresh)
    bundled = convert.flatten_variables(weights_lib.load_bundled(net))
    assert set(bundled) == set(fresh) and all(k.startswith("params/") for k in fresh)
    for k in fresh:
      np.testing.assert_array_equal(np.asarray(bundled[k]), fresh[k], err_msg=f"{net} {k}")
    # And both equal the torch tensors themselves under the documented re-layout.
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(fresh["params/conv1/kernel"], sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))


def test_convert_cli_registers_mtcnn(tmp_path):
  """`tools.convert_torch_weights` sees the MTCNN archs; a wrong checkpoint for the arch fails with named keys."""
  from erasablemask_jax import convert
  from tools.convert_torch_weights import __main__ as cli
  assert {"mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"} <= set(convert.list_archs())
  assert convert.get_arch("mtcnn_rnet").card["kind"] == "face_detector"
  from safetensors.numpy import save_file
  rnet = convert.flatten_variables(weights_lib.load_bundled("rnet"))
  torch_like = {k.removeprefix("params/").replace("/kernel", ".weight").replace("/bias", ".bias")
                .replace("/weight", ".weight"): np.ascontiguousarray(v.T if v.ndim == 2 else v) for k, v in rnet.items()
                if not k.endswith("kernel") or v.ndim == 2}
  save_file(torch_like, str(tmp_path / "rnet_partial.safetensors"))
  rc = cli.main(["--arch", "mtcnn_rnet", "--checkpoint", str(tmp_path / "rnet_partial.safetensors"),
                 "--out", str(tmp_path / "out")])
  assert rc == 1 and not (tmp_path / "out").exists()  # conv kernels are missing: strict merge refuses


def test_unknown_torch_key_is_an_error():
  assert list(archs.rename({"bn1.running_mean": np.zeros(3)})) == ["unmapped/bn1.running_mean"]
  with pytest.raises(convert.StrictMergeError, match="bn1.running_mean"):
    convert.convert_state_dict("mtcnn_pnet", {"bn1.running_mean": np.zeros(3)})
