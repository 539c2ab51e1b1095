"""`erasablemask train --config FILE --workdir DIR`: run (or resume) the three-stage curriculum, then report.

One run per workdir: a second one on a workdir in use exits with status 1 (`train.lock`). Resuming under a config that
differs from the workdir's config.json is refused (status 2) with the changed keys; `--allow-config-change` accepts the
safe ones (train.*, mesh.*, lengthening a stage that has not finished), see `train.resume`.
"""

import logging
import sys

from erasablemask_jax.config import add_config_argument, config_from_args


def register(subparsers) -> None:
  p = subparsers.add_parser("train", help="train ErasableMask (stages 1-3); rerun the same command to resume")
  add_config_argument(p)
  p.add_argument("--workdir", required=True, help="checkpoints, metrics, samples and the report go here")
  p.add_argument("--coordinator-address", help="multi-host: host:port of process 0 (else read from the environment)")
  p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")
  p.add_argument("--no-report", action="store_true", help="skip the closing white-box report")
  p.add_argument("--allow-config-change", action="store_true",
                 help="resume although the config differs from the workdir's config.json, for safe changes only: "
                      "train.*, mesh.*, and more steps or epochs for a stage that has not finished (an architecture "
                      "change always needs a new workdir)")
  p.set_defaults(func=run)


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'" on CPU
  config = config_from_args(args)
  import jax

  from erasablemask_jax.train import lock as lock_lib
  from erasablemask_jax.train import report as report_lib
  from erasablemask_jax.train import resume as resume_lib
  from erasablemask_jax.train import trainer as trainer_lib

  trainer_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  try:
    with lock_lib.workdir_lock(args.workdir, enabled=jax.process_index() == 0):
      resume_lib.check_resume_config(args.workdir, config, args.allow_config_change)
      trainer = trainer_lib.Trainer(config, args.workdir)
      state = trainer.run()
  except lock_lib.WorkdirBusyError as e:
    print(f"erasablemask train: {e}", file=sys.stderr)
    return 1
  if not args.no_report and jax.process_index() == 0 and trainer.surrogates:
    print(report_lib.format_report(report_lib.whitebox_report(trainer, state)))
  return 0
