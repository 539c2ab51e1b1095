"""Registers the metric networks with the converter: `lpips_alex`, `lpips_vgg`, `fid_inception`.

    python -m tools.convert_torch_weights --arch fid_inception pt_inception-2015-12-05-6726825d.pth OUT_DIR
    python -m tools.convert_torch_weights --arch lpips_alex lpips_alex_full.pth OUT_DIR

The LPIPS specs take one file holding trunk and heads together: a full `lpips.LPIPS(net=...).state_dict()`
(`net.sliceS.N.*` + `linK.model.1.weight`) or a merge of the torchvision checkpoint and the v0.1 heads. The two
separate files are read directly by `lpips.load_lpips(net, [trunk, heads])`.
"""

from __future__ import annotations

import functools

from erasablemask_jax import convert
from erasablemask_jax.convert import rules
from erasablemask_jax.metrics import fid
from erasablemask_jax.metrics import lpips


class _PairInputInit:
  """`convert.abstract_init` calls `build().init(rng, x)`; LPIPS takes a pair, so init it on (x, x)."""

  def __init__(self, net: str):
    self.module = lpips.LPIPS(net)

  def init(self, rng, x):
    return self.module.init(rng, x, x)


def _register() -> None:
  for net, trunk in (("alex", "torchvision alexnet"), ("vgg", "torchvision vgg16")):
    convert.register_arch(f"lpips_{net}", convert.ArchSpec(
        name=f"lpips_{net}", build=functools.partial(_PairInputInit, net), input_shape=(64, 64, 3),
        rename=functools.partial(rules.rename_flat, rules=lpips.RENAME_RULES, ignore=lpips.IGNORED_KEYS),
        card={"kind": "lpips", "net": net, "version": "0.1", "input_range": [-1.0, 1.0],
              "source_repository": f"{trunk} features + richzhang/PerceptualSimilarity lpips/weights/v0.1/{net}.pth"},
        description=f"LPIPS v0.1 with {trunk} features and linear heads"))
  convert.register_arch("fid_inception", convert.ArchSpec(
      name="fid_inception", build=functools.partial(fid.FIDInceptionV3, resize_input=False),
      input_shape=(fid.MIN_INPUT_SIZE, fid.MIN_INPUT_SIZE, 3),
      rename=functools.partial(rules.rename_flat, rules=fid.RENAME_RULES, ignore=fid.IGNORED_KEYS),
      card={"kind": "fid_inception", "feature_dim": fid.FEATURE_DIM, "input_size": fid.INPUT_SIZE,
            "input_range": [-1.0, 1.0], "source_repository": "mseitzer/pytorch-fid pt_inception-2015-12-05"},
      description="pytorch-fid InceptionV3 pool3 (2048-d) for FID"))


_register()
