"""The paper's setting (SPEC.md), the base every experiment config derives from.

Usage: `erasablemask train --config configs/default.py --config.data.batch_size=16`. Every field below is documented
where it is set; an unknown key or a value of the wrong type is an error naming the key.
"""

import ml_collections

ATTRIBUTES = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Male",
              "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young")


def set_widths(config: ml_collections.ConfigDict, dim: int, dis_fc_dim: int, max_dim: int) -> None:
  """Narrower (or wider) networks: G_enc, G_dec and D start at `dim` channels (the paper: 64), D's FC heads have
  `dis_fc_dim` units (1024) and no layer exceeds `max_dim` channels (1024)."""
  config.model.enc_dim = dim
  config.model.dec_dim = dim
  config.model.dis_dim = dim
  config.model.dis_fc_dim = dis_fc_dim
  config.model.max_dim = max_dim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"the default config has no variants (got {arg!r}); write --config default")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = 256
  config.attributes = ATTRIBUTES

  # Networks (AttGAN with shortcut_layers=1, inject_layers=1 as its released models) and the fusions of Eq. 7.
  config.model = ml_collections.ConfigDict()
  config.model.enc_dim = 64
  config.model.enc_layers = 5
  config.model.dec_dim = 64
  config.model.dec_layers = 5
  config.model.max_dim = 1024
  config.model.shortcut_layers = 1
  config.model.inject_layers = 1
  # The restorer R's own counts; -1 means "same as G". R never edits attributes, so more shortcuts (finer encoder
  # features reaching its decoder) may help identity recovery; an R that differs from G is initialised from G at the
  # start of stage 2 wherever the shapes agree, and its other weights are trained from scratch.
  config.model.r_shortcut_layers = -1
  config.model.r_inject_layers = -1
  config.model.dis_dim = 64
  config.model.dis_layers = 5
  config.model.dis_fc_dim = 1024
  config.model.beta = 0.5  # fs_i = beta * ft_i + (1 - beta) * perb_i (Eq. 7)
  config.model.gamma = 0.05  # clean-domain injection weight per decoder layer; 0 turns injection off
  config.model.thres_int = 0.5  # attribute code = (2a - 1) * thres_int
  config.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); parameters stay float32

  # Loss weights (Eq. 14-16) and the hinges of Eq. 8 and Eq. 12.
  config.loss = ml_collections.ConfigDict()
  config.loss.l_att = 10.0
  config.loss.l_rec = 150.0
  config.loss.l_g = 1.0
  config.loss.l_adv = 200.0
  config.loss.l_era = 150.0
  config.loss.l_perb = 1.0
  config.loss.l_att_d = 1.0  # weight of L_att^D in D's loss (AttGAN's lambda_3)
  config.loss.sigma1 = 30.0  # Eq. 8's hinge at 256x256; the step scales it by image_size / sigma1_reference_size
  config.loss.sigma1_reference_size = 256  # SPEC.md: the same per-pixel budget at every size (0: sigma1 unscaled)
  # Weight of L_id (R's output vs the source in the surrogates' embedding space) in stage 3's loss, beside L_era.
  # Not in the paper (0 = Eq. 16); `losses.identity_erasure_loss` says why a restorer may need it.
  config.loss.l_era_id = 0.0
  config.loss.epsilon = 0.0

  # Adam as AttGAN, one optimiser per trained network.
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-5
  config.optim.b1 = 0.5
  config.optim.b2 = 0.999

  # The attack on the perturbation encoder (Algorithm 1). kind: "meta_auxiliary" (exact second order, the paper's),
  # "first_order" (stop-gradient through the inner step, an approximation) or "ensemble" (the paper's ablation).
  config.attack = ml_collections.ConfigDict()
  config.attack.kind = "meta_auxiliary"
  # Inner SGD step size: the optimiser's learning rate (one symbol in the paper), followed when a derived config or an
  # override changes optim.lr; setting attack.lr_inner itself cuts the link (the `* 1.0` makes it a reference of its
  # own, so that setting it never writes optim.lr).
  config.attack.lr_inner = config.optim.get_ref("lr") * 1.0
  # How the K primaries are evaluated (all exact): "unrolled", "linearize", "vmap" or "scan" (least memory).
  config.attack.primaries = "unrolled"

  # Face recognition. Each entry is a converted FR directory (tools/convert_torch_weights) or "bundled:NAME".
  config.fr = ml_collections.ConfigDict()
  config.fr.surrogates = ("fr/ir_152", "fr/ir_se_50", "fr/mobilefacenet")  # white-box, attacked in training
  config.fr.blackbox = ("fr/facenet", "fr/arcface_iresnet100", "fr/cosface_iresnet100")  # evaluation only
  # Scored in the closing report beside the surrogates, as black boxes of that report only (never trained against):
  # specs as above, "shared:*" for every real model of ../shared/assets that loads (`fr.real_models.expand`).
  config.fr.report_models = ()
  config.fr.target = ""  # the target identity: an image file, a folder of them, or "identity:K" of the data folder
  # Where the FR models' aligned face sits in the generator's image before resizing to their input: "none" (resize
  # the whole image, as the paper) or "loose_to_arcface" (the ArcFace box inside our aligner's loose 256 crop).
  config.fr.input_crop = "none"
  config.fr.tau1_far = 0.01  # ASR threshold: the model's threshold at this FAR
  config.fr.tau2_far = 0.1  # ESR threshold
  # Thresholds come from each model's card, calibrated on the view it scores (`erasablemask calibrate --run WORKDIR`),
  # else its arcface112 calibration (labelled a fallback). "peer_default" adds, for a model calibrated on neither, the
  # peers' published LFW thresholds of its architecture (ir_152, ir_se_50, inception_resnet_v1; valid for the peers'
  # original weights), labelled "peer default, not calibrated here". `fr.thresholds` has the rule.
  config.fr.threshold_source = "calibrated"
  # Train against the surrogates with each inference BatchNorm folded into the convolution before it (`fr.fold`): the
  # same networks up to float rounding, and a 0.88x meta-auxiliary step on CPU (benchmarks/README.md, "Headroom").
  config.fr.fold_batchnorm = True

  # Noise pool: one member per batch (identity included) on x_adv before the FR models (stage 2) and before R (stage 3).
  config.noise = ml_collections.ConfigDict()
  config.noise.train_pool = ("identity", "jpeg50", "gauss0.003", "resize0.25")
  config.noise.jpeg_rounding = "ste"  # training JPEG: "ste" (bit-exact libjpeg forward, identity gradient) or "cubic"
  config.noise.eval_transforms = ("jpeg50", "gauss0.003", "resize0.5", "median5", "rotate30", "crop224")

  # Curriculum (Eq. 14-16). A stage's length is `*_steps` when >= 0 (0 skips it), else `*_epochs` over the training split.
  config.schedule = ml_collections.ConfigDict()
  config.schedule.stage1_epochs = 200
  config.schedule.stage2_epochs = 100
  config.schedule.stage3_epochs = 50
  config.schedule.stage1_steps = -1
  config.schedule.stage2_steps = -1
  config.schedule.stage3_steps = -1

  # Data: a tfds builder ("celeba_hq" | "ffhq" | "face_folder") prepared under data_dir, or a folder of faces.
  config.data = ml_collections.ConfigDict()
  config.data.name = "celeba_hq"
  config.data.data_dir = ""  # where the builder's array_record files live
  config.data.manual_dir = ""  # the raw files the builder prepares from
  config.data.batch_size = 32  # global batch, split over the `data` mesh axis and over hosts
  config.data.flip = True
  config.data.shuffle_seed = 0
  config.data.worker_count = 0  # grain worker processes (0: in the main process)
  config.data.eval_identities = ()  # in-memory folders: identities held out of training, for evaluation

  # Bookkeeping.
  config.train = ml_collections.ConfigDict()
  config.train.checkpoint_every_steps = 1000
  config.train.max_checkpoints_to_keep = 3
  config.train.log_every_steps = 50
  config.train.sample_every_steps = 1000
  config.train.num_sample_images = 8

  # Devices: a 1-D mesh with a `data` axis; -1 uses every device of every host. The train state is "replicated" on
  # every device, or "sharded": each large parameter and its Adam moments split over the `data` axis (ZeRO-3 / FSDP),
  # for a setting whose replicated state does not fit a chip (`erasablemask compile` tells).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.state = "replicated"
  return config
