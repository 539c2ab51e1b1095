"""Registers the face-recognition zoo with the converter (`erasablemask_jax.convert.register_arch`).

| name | source | input | normalisation | embedding |
|---|---|---|---|---|
| iresnet18/34/50/100/200 | insightface arcface_torch `iresnet.py` | 112x112 | (p/255-0.5)/0.5 | 512 |
| ir_50/100/152, ir_se_50/100/152 | face.evoLVe `model_irse.py` | 112x112 | (p/255-0.5)/0.5 | 512 |
| inception_resnet_v1 | facenet-pytorch | 160x160 | (p-127.5)/128 | 512 |
| mobilefacenet | foamliu/MobileFaceNet | 112x112 | ImageNet mean/std | 128 |
| mobilefacenet_sphereface | Xiaoccer/MobileFaceNet_Pytorch | 112x96 (8 px cut off each side of a 112x112 crop) | (p-127.5)/128 | 128 |
| mobileface_v2 | becauseofAI/MobileFace V2 (MXNet `.params` + `-symbol.json`) | 112x112 RGB | (p-127.5)/128 (in the graph) | 256 |
| tfjs | any TF.js graph model (`model.json` + `.bin`); the known ones: HSE faceres / faceres-deep, MobileFace V3 | the graph's (224 / 112) | per model (`--preprocess`, or the known graph's: BGR minus Caffe means / pixels 0..255) | the output node's (1024 / 256) |

All but `mobileface_v2` and `tfjs` are PyTorch state dicts; `mobileface_v2` is MXNet (`checkpoint_format="mxnet"`),
renamed by `convert.mxnet.mxnet_to_flax_flat` and checked against its symbol graph's layers
(`mobileface_v2.mxnet_layers`); `tfjs` reads a TF.js graph with `convert.tfjs` and runs it with `fr.tfjs_graph` (its
module is built from the graph program stored in the card).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from erasablemask_jax import convert
from erasablemask_jax.fr import inception_resnet_v1
from erasablemask_jax.fr import iresnet
from erasablemask_jax.fr import irse
from erasablemask_jax.fr import mobileface_v2
from erasablemask_jax.fr import mobilefacenet
from erasablemask_jax.fr import tfjs_graph
from erasablemask_jax.fr.preprocess import FACENET_STANDARDISATION
from erasablemask_jax.fr.preprocess import IMAGENET_MEAN
from erasablemask_jax.fr.preprocess import IMAGENET_STD
from erasablemask_jax.fr.preprocess import MINUS1_1
from erasablemask_jax.fr.preprocess import Preprocessing

ARCFACE_ALIGNMENT = "5-point similarity to the ArcFace 112x112 template"


def _rename_with_nchw_fc(state: Mapping[str, np.ndarray], fc: str, chw: tuple[int, int, int],
                         ignore: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Generic rename, then the Linear after the NCHW flatten gets its rows permuted (when its shape fits)."""
  flat = convert.torch_to_flax_flat(state, ignore=ignore)
  w = state.get(f"{fc}.weight")
  if w is not None and w.ndim == 2 and w.shape[1] == int(np.prod(chw)):
    flat[f"params/{convert.default_module_path(fc)}/kernel"] = convert.linear_after_nchw_flatten(w, chw)
  return flat


def _card(prep: Preprocessing, embedding_size: int, source: str, alignment: str, **extra: Any) -> dict[str, Any]:
  card = {"kind": "face_recognition", "embedding_size": embedding_size, "source_repository": source,
          "alignment": alignment, "thresholds": {}}
  card.update(prep.to_card())
  card.update(extra)
  return card


def _register() -> None:
  arcface_prep = Preprocessing((112, 112), **MINUS1_1)
  for depth, layers in iresnet.IRESNET_LAYERS.items():
    name = f"iresnet{depth}"
    convert.register_arch(name, convert.ArchSpec(
        name=name, build=functools.partial(iresnet.IResNet, layers), input_shape=(112, 112, 3),
        rename=functools.partial(_rename_with_nchw_fc, fc="fc", chw=(512, 7, 7)),
        card=_card(arcface_prep, 512, "insightface recognition/arcface_torch backbones/iresnet.py", ARCFACE_ALIGNMENT),
        description=f"IResNet-{depth} (arcface_torch; ArcFace/CosFace)"))
  for se in (False, True):
    for depth, units in irse.IR_UNITS.items():
      name = f"ir_se_{depth}" if se else f"ir_{depth}"
      convert.register_arch(name, convert.ArchSpec(
          name=name, build=functools.partial(irse.IRBackbone, units, se), input_shape=(112, 112, 3),
          rename=functools.partial(_rename_with_nchw_fc, fc="output_layer.3", chw=(512, 7, 7)),
          card=_card(arcface_prep, 512, "ZhaoJ9014/face.evoLVe backbone/model_irse.py", ARCFACE_ALIGNMENT),
          description=f"{'IR-SE' if se else 'IR'}-{depth} (face.evoLVe / InsightFace_Pytorch)"))
  convert.register_arch("inception_resnet_v1", convert.ArchSpec(
      name="inception_resnet_v1", build=inception_resnet_v1.InceptionResnetV1, input_shape=(160, 160, 3),
      rename=functools.partial(convert.torch_to_flax_flat, ignore=(r"logits\..*",)),
      card=_card(Preprocessing((160, 160), **FACENET_STANDARDISATION), 512,
                 "timesler/facenet-pytorch models/inception_resnet_v1.py", "MTCNN box crop with margin, 160x160"),
      description="FaceNet InceptionResnetV1 (facenet-pytorch)"))
  convert.register_arch("mobilefacenet", convert.ArchSpec(
      name="mobilefacenet", build=mobilefacenet.MobileFaceNetFoamliu, input_shape=(112, 112, 3),
      rename=convert.torch_to_flax_flat,
      card=_card(Preprocessing((112, 112), IMAGENET_MEAN, IMAGENET_STD), 128, "foamliu/MobileFaceNet mobilefacenet.py",
                 ARCFACE_ALIGNMENT),
      description="MobileFaceNet, foamliu layout (112x112, ImageNet mean/std)"))
  convert.register_arch("mobilefacenet_sphereface", convert.ArchSpec(
      name="mobilefacenet_sphereface", build=mobilefacenet.MobileFaceNetSphereFace, input_shape=(112, 96, 3),
      rename=convert.torch_to_flax_flat,
      card=_card(Preprocessing((112, 96), **FACENET_STANDARDISATION, crop_fraction=(1.0, 96 / 112)), 128,
                 "Xiaoccer/MobileFaceNet_Pytorch core/model.py",
                 "SphereFace 112x96 = ArcFace 112x112 template with 8 px cut from each side"),
      description="MobileFaceNet, Xiaoccer layout (112x96 SphereFace crop, (p-127.5)/128)"))
  # The graph's own `(p - 127.5) * 0.0078125` equals FACENET_STANDARDISATION's ((p/255) - 0.5) / (128/255).
  convert.register_arch("mobileface_v2", convert.ArchSpec(
      name="mobileface_v2", build=mobileface_v2.MobileFaceV2, input_shape=(112, 112, 3),
      rename=functools.partial(convert.mxnet.mxnet_to_flax_flat, nchw_flatten={"fc5": mobileface_v2.FC_INPUT_CHW}),
      card=_card(Preprocessing((112, 112), **FACENET_STANDARDISATION), mobileface_v2.EMBEDDING_SIZE,
                 "becauseofAI/MobileFace MobileFace_Identification/MobileFace_Identification_V2", ARCFACE_ALIGNMENT),
      description="MobileFace V2 (becauseofAI/MobileFace, MXNet .params; MobileNetV2-style, ReLU6, 256-d)",
      checkpoint_format="mxnet", symbol_layers=mobileface_v2.mxnet_layers))
  # Any TF.js graph model: the graph itself is the architecture (`fr.tfjs_graph`), stored in the card.
  convert.register_arch(tfjs_graph.ARCH, convert.ArchSpec(
      name=tfjs_graph.ARCH, build=_graph_needs_card, input_shape=(0, 0, 3), rename=_graph_needs_card,
      description="a TensorFlow.js graph model (model.json + .bin shards), run by a jax.numpy interpreter of its ops",
      checkpoint_format="tfjs", from_card=tfjs_graph.module_from_card, convert_graph=tfjs_graph.convert_graph))


def _graph_needs_card(*_: Any) -> Any:
  raise ValueError("a tfjs graph is built from its converted model card (`fr.tfjs_graph.module_from_card`), and "
                   "converted from its model.json by `convert.convert_checkpoint`, not from a state dict")


_register()
