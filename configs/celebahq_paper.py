"""The paper's full setting on CelebA-HQ (SPEC.md): 256x256, 200/100/50 epochs, three white-box surrogates.

Expects, under `fr/` (or override the paths), FR directories converted with `tools.convert_torch_weights`:
white-box IR-152, IR-SE-50 and MobileFaceNet; black-box FaceNet, ArcFace and CosFace IResNet-100; and the CelebA-HQ
builder prepared into `data/` from its manual directory, aligned as the paper does (MTCNN, our `loose` 256 template:
`builders.build(..., align=True)`, the `s256_aligned` builder config):

  python -c "from erasablemask_jax.data import builders; \\
      print(builders.build('celeba_hq', 'CelebAMask-HQ', 'data', image_size=256, align=True))"
  python -m tools.convert_torch_weights --arch ir_152 --checkpoint ir152.pth --out fr/ir_152
  ...
  erasablemask calibrate --fr fr/ir_152 --view loose_to_arcface --image-size 256 --faces LOOSE_256_FACES \\
      --identities attributes.csv --out ir_152.json --store       # each FR model, on loose crops of known people
  erasablemask train --config configs/celebahq_paper.py --workdir runs/celebahq --config.fr.target=target.jpg

The FR models see the ArcFace box of each loose crop (`fr.input_crop = "loose_to_arcface"`), the crop they were trained
on. Thresholds: each model's calibration of that view (`loose_to_arcface@256`), else its arcface112 one, else the peers'
published LFW thresholds for IR-152, IR-SE-50 and FaceNet (`fr.threshold_source = "peer_default"`), labelled as such
in the reports.
"""

from configs import default


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"the celebahq_paper config has no variants (got {arg!r}); write --config celebahq_paper")
  config = default.get_config()
  config.data.name = "celeba_hq"
  config.data.data_dir = "data/celeba_hq/s256_aligned/1.0.0"  # what builders.build(..., align=True) returns
  config.fr.surrogates = ("fr/ir_152", "fr/ir_se_50", "fr/mobilefacenet")
  config.fr.blackbox = ("fr/facenet", "fr/arcface_iresnet100", "fr/cosface_iresnet100")
  config.fr.target = "target.jpg"
  config.fr.input_crop = "loose_to_arcface"  # the aligned build holds loose crops; the models see their ArcFace box
  config.fr.threshold_source = "peer_default"
  config.model.dtype = "float32"
  return config
