"""The paper's full setting on CelebA-HQ (SPEC.md): 256x256, 200/100/50 epochs, three white-box surrogates.

Expects, under `fr/` (or override the paths), FR directories converted with `tools.convert_torch_weights`:
white-box IR-152, IR-SE-50 and MobileFaceNet; black-box FaceNet, ArcFace and CosFace IResNet-100; and the CelebA-HQ
builder prepared into `data/` from its manual directory:

  python -m tools.convert_torch_weights --arch ir_152 --checkpoint ir152.pth --out fr/ir_152
  ...
  erasablemask train --config configs/celebahq_paper.py --workdir runs/celebahq \\
      --config.fr.target=target.jpg --config.data.data_dir=data/celeba_hq
"""

from configs import default


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"the celebahq_paper config has no variants (got {arg!r}); write --config celebahq_paper")
  config = default.get_config()
  config.data.name = "celeba_hq"
  config.data.data_dir = "data/celeba_hq"
  config.fr.surrogates = ("fr/ir_152", "fr/ir_se_50", "fr/mobilefacenet")
  config.fr.blackbox = ("fr/facenet", "fr/arcface_iresnet100", "fr/cosface_iresnet100")
  config.fr.target = "target.jpg"
  config.model.dtype = "float32"
  return config
