"""`erasablemask train --config FILE --workdir DIR`: run (or resume) the three-stage curriculum, then report.

One run per workdir: a second one on a workdir in use exits with status 1 (`train.lock`). Resuming under a config that
differs from the workdir's config.json is refused (status 2) with the changed keys; `--allow-config-change` accepts the
safe ones (train.*, mesh.*, lengthening a stage that has not finished), see `train.resume`.

Stopping and faults (`train.preemption`), each ending with one line on stderr that says how to go on:
- Ctrl-C or SIGTERM saves a checkpoint after the current step (on several hosts, the same step on every host) and
  exits with 128 + the signal's number: 130 after Ctrl-C, 143 after SIGTERM (143 also on the hosts that were stopped
  because another host got it). A second signal stops at once. Rerunning the same command resumes.
- Another host of a multi-host run lost (killed, crashed): this host exits with status 1 within `--heartbeat-timeout`
  seconds, naming the last complete checkpoint; rerunning the same command on every host resumes from it.
- A full disk or a read-only workdir during a save: status 1, the previous checkpoint intact and named.
- A damaged newest checkpoint (a truncated or missing file): the resume warns which step, sets it aside as
  `<step>.damaged` and resumes from the newest intact one; if none reads back, status 1 and nothing changes.
"""

import os
import sys

from erasablemask_jax.commands import _outputs
from erasablemask_jax.config import add_config_argument, config_from_args

OUTPUTS = "config.json, checkpoints/, metrics.jsonl, samples/, tensorboard/"


def register(subparsers) -> None:
  p = subparsers.add_parser("train", help="train ErasableMask (stages 1-3); rerun the same command to resume")
  add_config_argument(p)
  p.add_argument("--workdir", required=True, help="checkpoints, metrics, samples and the report go here")
  p.add_argument("--coordinator-address", help="multi-host: host:port of process 0 (else read from the environment)")
  p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")
  p.add_argument("--heartbeat-timeout", type=int, default=None, metavar="SECONDS",
                 help="multi-host: a host silent this long is declared dead and every other host stops (default: "
                      "100, JAX's)")
  p.add_argument("--no-report", action="store_true", help="skip the closing white-box report")
  p.add_argument("--allow-config-change", action="store_true",
                 help="resume although the config differs from the workdir's config.json, for safe changes only: "
                      "train.*, mesh.*, and more steps or epochs for a stage that has not finished (an architecture "
                      "change always needs a new workdir)")
  p.set_defaults(func=run)


def run(args) -> int:
  config = config_from_args(args)
  _outputs.check_writable(args.workdir, "--workdir")
  # Joining the other hosts comes before anything that could start a JAX backend (imports of the trainer included).
  from erasablemask_jax.train import mesh as mesh_lib

  mesh_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                  args.heartbeat_timeout or mesh_lib.DEFAULT_HEARTBEAT_TIMEOUT_S)
  import jax

  from erasablemask_jax.convert import CheckpointError, ModelDirError
  from erasablemask_jax.data.labels import LabelFileError
  from erasablemask_jax.train import lock as lock_lib
  from erasablemask_jax.train import checkpoint as checkpoint_lib
  from erasablemask_jax.train import report as report_lib
  from erasablemask_jax.train import resume as resume_lib
  from erasablemask_jax.train import trainer as trainer_lib

  try:
    with lock_lib.workdir_lock(args.workdir, enabled=jax.process_index() == 0):
      resume_lib.check_resume_config(args.workdir, config, args.allow_config_change)
      trainer = trainer_lib.Trainer(config, args.workdir)
      state = trainer.run()
  except trainer_lib.TrainingInterrupted as e:
    print(f"erasablemask train: {e}", file=sys.stderr)
    return e.exit_status
  except (trainer_lib.HostLostError, trainer_lib.CheckpointSaveError) as e:
    _end_now(f"erasablemask train: {e}", 1)
  except (lock_lib.WorkdirBusyError, trainer_lib.NonFiniteLossError, checkpoint_lib.DamagedCheckpointError,
          ModelDirError, CheckpointError, LabelFileError) as e:
    print(f"erasablemask train: {e}", file=sys.stderr)
    return 1
  if not args.no_report and jax.process_index() == 0 and trainer.surrogates:
    blackbox, blackbox_targets, not_scored = report_lib.load_report_models(trainer.config, trainer.surrogates,
                                                                            trainer.target_images)
    report = report_lib.whitebox_report(trainer.models, state, trainer.surrogates, trainer.targets,
                                        config=trainer.config, workdir=trainer.workdir, blackbox=blackbox,
                                        blackbox_targets=blackbox_targets, not_scored=not_scored,
                                        **trainer.report_faces())
    print(report_lib.format_report(report))
    _photos(trainer)
  print(_outputs.outputs_line("train", args.workdir, OUTPUTS))
  return 0


def _photos(trainer) -> None:
  """The held-out people's original photos, protected and restored (`evaluation.photos.demo_photos`), when the run
  trained on the bundled sample faces and the shared assets hold their originals; else one line why not."""
  from erasablemask_jax.evaluation import photos  # pylint: disable=import-outside-toplevel

  splits = trainer.splits
  files = [] if splits is None else list(splits.eval["file"])
  try:
    report, line = photos.demo_photos(trainer.workdir, files, str(trainer.config.data.manual_dir))
  except (FileNotFoundError, ValueError) as e:  # the run is trained and saved whatever happens to its photos
    report, line = None, f"photos: not made: {e}"
  if report is not None:
    print(photos.format_photos_report(report))
  print(line)


def _end_now(line: str, status: int) -> None:
  """Prints `line` and ends the process without Python's shutdown, which has nothing left to save or close here.

  After a lost host, JAX's distributed client would wait at its shutdown barrier for every host, the lost one too,
  until its shutdown timeout, then abort with a C++ stack trace; after a refused save, each of orbax's writes still in
  flight would print a traceback as the interpreter shuts down.
  """
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access
