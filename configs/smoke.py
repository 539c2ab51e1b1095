"""A tiny variant for tests: 32x32 images, thin networks, a couple of steps per stage."""

from configs import default


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"the smoke config has no variants (got {arg!r}); write --config smoke")
  config = default.get_config()
  config.image_size = 32
  default.set_widths(config, 8, dis_fc_dim=16, max_dim=64)
  config.data.name = "face_folder"
  config.data.batch_size = 4
  config.schedule.stage1_steps = 2
  config.schedule.stage2_steps = 2
  config.schedule.stage3_steps = 2
  config.train.checkpoint_every_steps = 2
  config.train.log_every_steps = 1
  config.train.sample_every_steps = 2
  config.train.num_sample_images = 2
  config.fr.surrogates = ()
  config.fr.blackbox = ()
  return config
