"""The README's main job: the bundled sample faces and the bundled real MobileFaceNet surrogate, at 64x64, with
quarter-width networks and 2000/200/60 steps, so the whole curriculum runs in about eleven minutes on a 2-core CPU."""

from configs import default


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"the demo config has no variants (got {arg!r}); write --config demo")
  config = default.get_config()
  config.image_size = 64
  default.set_widths(config, 16, dis_fc_dim=128, max_dim=256)
  # R keeps G's structure (model.r_shortcut_layers = -1), so stage 2 starts it as an exact copy of the stage-1 G, whose
  # decode of x_adv with att_a already verifies 6 of 7 held-out faces as the person. An R with four shortcuts (its
  # widened decoder layers start from scratch) learnt a blurrier restorer from the 20 training faces: IRR 4-5 of 7 after
  # 60 stage-3 steps, 2 of 7 after 500 (it overfits); with G's structure IRR is 7 of 7 (README, the demo's runs).
  # G with three shortcuts and a longer stage 1 (cheap at 64x64): a one-shortcut G after 200 steps edits held-out
  # faces into strangers (cos to the source ~0), so x_adv holds too little of the person for R to give back (IRR 0 of 7);
  # two shortcuts and 1000 steps still only reach 0.24 on 20 training faces (IRR 0 of 7, ASR 6 of 7); three and 2000
  # keep the person in the edit (0.55, SMR 7 of 7).
  config.model.shortcut_layers = 3
  config.data.name = "face_folder"
  config.data.manual_dir = "bundled:sample_faces"
  config.data.batch_size = 8
  # One bundled network, seen as two surrogates (itself and its mirrored view): the meta-auxiliary attack needs K >= 2.
  config.fr.surrogates = ("bundled:mobilefacenet", "bundled:mobilefacenet@flip")
  config.fr.blackbox = ()
  config.fr.target = "identity:0"  # two photos of one person; never trained on
  config.fr.input_crop = "loose_to_arcface"  # the bundled faces are loose crops of our aligner
  config.data.eval_identities = (2, 3, 4)  # seven held-out faces for the closing report
  config.optim.lr = 3e-4  # fifteen times the paper's: a few hundred steps instead of 350 epochs; lr_inner follows it
  # The closing report also scores the faces with every real FR model of ../shared/assets it can load (five more, two
  # families), none of which the attack saw: a newcomer sees more than one network's verdict.
  config.fr.report_models = ("shared:*",)
  # R learns from L_era alone under Adam (scale-invariant), so l_era only weighs restorability in E_adv's loss against
  # the attack; the paper's 150 drowns the attack in a few hundred steps (benchmarks/README.md, "Transfer study").
  config.loss.l_era = 1.0
  config.schedule.stage1_steps = 2000
  config.schedule.stage2_steps = 200
  config.schedule.stage3_steps = 60
  config.train.checkpoint_every_steps = 100
  config.train.log_every_steps = 10
  config.train.sample_every_steps = 100
  return config
