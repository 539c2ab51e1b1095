"""Registers MTCNN's P-, R- and O-Net with the converter (`erasablemask_jax.convert.register_arch`).

| name | PyTorch source | input (one example) | normalisation | outputs |
|---|---|---|---|---|
| mtcnn_pnet | facenet-pytorch `models/mtcnn.py` `PNet`, `data/pnet.pt` | 12x12 (any size >= 12) | (p - 127.5) / 128 | reg map, face prob map |
| mtcnn_rnet | facenet-pytorch `RNet`, `data/rnet.pt` | 24x24 | (p - 127.5) / 128 | reg, face prob |
| mtcnn_onet | facenet-pytorch `ONet`, `data/onet.pt` | 48x48 | (p - 127.5) / 128 | reg, 5 landmarks, face prob |

So `python -m tools.convert_torch_weights --arch mtcnn_onet --checkpoint onet.pt --out DIR` writes a model directory
(orbax variables + `card.json`), which is how the bundled copies in `erasablemask_jax/assets/mtcnn/{pnet,rnet,onet}/`
are made (`python -m erasablemask_jax.align.weights SRC_DIR`). The rename is the `convert.rules` table `RENAME_RULES`,
every path under the `params` collection (the nets have no batch statistics); a torch key with no rule is an error:

  `convN.weight` (O, I, kh, kw) -> `convN/kernel` (kh, kw, I, O);   `convN.bias` -> `convN/bias`
  `denseN.weight` (O, I)        -> `denseN/kernel` (I, O);          `denseN.bias` -> `denseN/bias`
  `preluN.weight` (C,)          -> `preluN/weight` (C,)
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from erasablemask_jax import convert
from erasablemask_jax.align import mtcnn
from erasablemask_jax.convert import rules

NETS = ("pnet", "rnet", "onet")

SOURCE_REPOSITORY = "timesler/facenet-pytorch models/mtcnn.py @ 787da06156087cd6b616fe6608213722bddc30cd"
LICENSE = "MIT (c) 2019 Timothy Esler (facenet-pytorch); see LICENSE beside the bundled weights"

_OUTPUTS = {
    "pnet": ["reg (B, H', W', 4)", "face_prob (B, H', W')"],
    "rnet": ["reg (B, 4)", "face_prob (B,)"],
    "onet": ["reg (B, 4)", "landmarks (B, 10): 5 x then 5 y, in box units", "face_prob (B,)"],
}


RENAME_RULES = (  # `{n}` is one key segment: conv1, conv4_1, dense5_2, prelu3, ...
    rules.Rule("conv{n}.weight", "params/conv{n}/kernel", "conv"),
    rules.Rule("conv{n}.bias", "params/conv{n}/bias"),
    rules.Rule("dense{n}.weight", "params/dense{n}/kernel", "linear"),
    rules.Rule("dense{n}.bias", "params/dense{n}/bias"),
    rules.Rule("prelu{n}.weight", "params/prelu{n}/weight"),
)


def arch_name(net: str) -> str:
  """Registry name of MTCNN sub-network `net` ('pnet' | 'rnet' | 'onet'): `mtcnn_<net>`."""
  if net not in NETS:
    raise KeyError(f"unknown MTCNN network {net!r}; choose one of {NETS}")
  return f"mtcnn_{net}"


def rename(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """facenet-pytorch MTCNN state dict -> `{"params/conv1/kernel": array, ...}` (`RENAME_RULES`; a key no rule claims
  comes back as `unmapped/<key>`, which the strict merge names)."""
  return rules.rename_flat(state, RENAME_RULES, ignore=())


def _register() -> None:
  for net in NETS:
    hw = mtcnn.INPUT_SHAPES[net][1:3]
    convert.register_arch(arch_name(net), convert.ArchSpec(
        name=arch_name(net), build=mtcnn.MODULES[net], input_shape=tuple(mtcnn.INPUT_SHAPES[net][1:]), rename=rename,
        card={"kind": "face_detector", "family": "mtcnn", "net": net, "input_size": list(hw),
              "input_range": "(pixels - 127.5) * 0.0078125, RGB, NHWC", "outputs": _OUTPUTS[net],
              "source_repository": SOURCE_REPOSITORY, "license": LICENSE},
        description=f"MTCNN {net[0].upper()}-Net (facenet-pytorch data/{net}.pt)"))


_register()
