"""The README's main job: the bundled sample faces and the bundled real MobileFaceNet surrogate, at 64x64, with
quarter-width networks and 200/200/60 steps, so the whole curriculum runs in about ten minutes on a 2-core CPU."""

from configs import default


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"the demo config has no variants (got {arg!r}); write --config demo")
  config = default.get_config()
  config.image_size = 64
  default.set_widths(config, 16, dis_fc_dim=128, max_dim=256)
  # R never edits attributes: with a shortcut at every encoder scale but the bottleneck its decoder gets the detail
  # that identity recovery needs; G's single shortcut alone restores faces too blurry to verify as the person.
  config.model.r_shortcut_layers = 4
  config.data.name = "face_folder"
  config.data.manual_dir = "bundled:sample_faces"
  config.data.batch_size = 8
  # One bundled network, seen as two surrogates (itself and its mirrored view): the meta-auxiliary attack needs K >= 2.
  config.fr.surrogates = ("bundled:mobilefacenet", "bundled:mobilefacenet@flip")
  config.fr.blackbox = ()
  config.fr.target = "identity:0"  # two photos of one person; never trained on
  config.fr.input_crop = "loose_to_arcface"  # the bundled faces are loose crops of our aligner
  config.data.eval_identities = (2, 3, 4)  # seven held-out faces for the closing report
  config.optim.lr = 3e-4  # fifteen times the paper's: a few hundred steps instead of 350 epochs
  config.attack.lr_inner = 2e-4
  config.schedule.stage1_steps = 200
  config.schedule.stage2_steps = 200
  config.schedule.stage3_steps = 60
  config.train.checkpoint_every_steps = 100
  config.train.log_every_steps = 10
  config.train.sample_every_steps = 100
  return config
