"""Runs the tiny trainer in its own process (for the kill/resume, multi-device and multi-host tests).

Usage: python run_tiny.py WORKDIR --out PARAMS.npz [--kill-at STEP] [--schedule 1,3,1] [--coordinator HOST:PORT
       --num-processes N --process-id I] [--mesh-state sharded --min-sharded-size N]
"""

import argparse
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--out", required=True)
  parser.add_argument("--kill-at", type=int, default=-1)
  parser.add_argument("--schedule", default="1,3,1")
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--mesh-state", default="replicated")
  parser.add_argument("--min-sharded-size", type=int, help="shard state leaves from this many elements (the tiny "
                      "networks' leaves are all below the default)")
  args = parser.parse_args()

  import jax

  from erasablemask_jax.train import mesh as mesh_lib
  from erasablemask_jax.train import trainer
  import tiny

  if args.min_sharded_size is not None:
    mesh_lib.MIN_SHARDED_SIZE = args.min_sharded_size

  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  config = tiny.tiny_config_for_process_tests(args.schedule)
  config.mesh.state = args.mesh_state
  source = tiny.tiny_source(config, n=16, process_index=jax.process_index(), process_count=jax.process_count())

  def on_step(step):
    if step == args.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  t = trainer.Trainer(config, args.workdir, source=source, surrogates=tiny.tiny_surrogates(),
                      target_images=tiny.tiny_target(config))
  state = t.run(on_step=on_step)
  sharded = [a for a in jax.tree.leaves(state) if any(getattr(a.sharding, "spec", ()))]
  print(f"sharded state leaves: {len(sharded)}")
  if jax.process_index() == 0:
    import numpy as np
    flat = jax.tree_util.tree_flatten_with_path(trainer.params_of(state))[0]
    np.savez(args.out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
  main()
