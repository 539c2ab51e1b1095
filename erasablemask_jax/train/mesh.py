"""Devices and hosts: joining a multi-host run, the `data` mesh built from config, and the batch check.

One `Mesh` with a `data` axis over `mesh.data` devices (-1: all, over all hosts); the global batch is sharded along it,
the state replicated; multi-host runs call `jax.distributed.initialize` first (`initialize_distributed`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh

from erasablemask_jax.config import ConfigError


# How long a host may go silent before the coordination service declares it dead and every other host stops
# (`jax.distributed.initialize(heartbeat_timeout_seconds=...)`; JAX's own default is 100 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
  """Joins a multi-host run when one is asked for; returns whether `jax.distributed` is initialized.

  A run is multi-host when any argument is given or `JAX_COORDINATOR_ADDRESS` is set; JAX reads what is not given from
  the cluster's environment (TPU pods, SLURM, ...). This must come before anything that starts a JAX backend
  (`jax.devices()`, `jax.process_count()`, any computation), so it only reads the environment and JAX's config.

  Joining also starts JAX's preemption service (its handler takes over SIGTERM: `train.preemption`) and the
  coordination service's heartbeats: a host silent for `heartbeat_timeout_s` seconds is declared dead, and JAX ends
  every other host instead of leaving them waiting in a collective. CPU hosts run their collectives through gloo.
  """
  if jax.distributed.is_initialized():
    return True
  if (coordinator_address is None and num_processes is None and process_id is None
      and "JAX_COORDINATOR_ADDRESS" not in os.environ):
    return False
  # Only the CPU client reads it, so it is set whatever the platform (asking which platform would start a backend).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
  return True


def make_mesh(mesh_config) -> Mesh:
  """A 1-D mesh with a `data` axis over `mesh.data` devices (-1: every device of every host)."""
  devices = jax.devices()
  n = len(devices) if mesh_config.data in (-1, 0) else mesh_config.data
  if n > len(devices):
    raise ConfigError(f"mesh.data={n} but only {len(devices)} devices are visible; set --config.mesh.data=-1 "
                      "(every device) or a smaller count")
  return Mesh(np.asarray(devices[:n]), ("data",))


def check_batch_divides(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size or global_batch % jax.process_count():
    raise ConfigError(f"data.batch_size={global_batch} does not divide over {mesh.size} devices and "
                      f"{jax.process_count()} hosts; use a multiple of {math.lcm(mesh.size, jax.process_count())} "
                      "(--config.data.batch_size=N) or fewer devices (--config.mesh.data=N)")
