"""`erasablemask train --config FILE --workdir DIR`: run (or resume) the three-stage curriculum, then report."""

import logging

from erasablemask_jax.config import add_config_argument, config_from_args


def register(subparsers) -> None:
  p = subparsers.add_parser("train", help="train ErasableMask (stages 1-3); rerun the same command to resume")
  add_config_argument(p)
  p.add_argument("--workdir", required=True, help="checkpoints, metrics, samples and the report go here")
  p.add_argument("--coordinator-address", help="multi-host: host:port of process 0 (else read from the environment)")
  p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")
  p.add_argument("--no-report", action="store_true", help="skip the closing white-box report")
  p.set_defaults(func=run)


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  config = config_from_args(args)
  import jax

  from erasablemask_jax.train import report as report_lib
  from erasablemask_jax.train import trainer as trainer_lib

  trainer_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  trainer = trainer_lib.Trainer(config, args.workdir)
  state = trainer.run()
  if not args.no_report and jax.process_index() == 0 and trainer.surrogates:
    print(report_lib.format_report(report_lib.whitebox_report(trainer, state)))
  return 0
