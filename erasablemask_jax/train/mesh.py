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


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host run. Without arguments JAX reads the cluster's environment (TPU pods, SLURM, ...).

  On CPU hosts, collectives go through gloo.
  """
  if jax.process_count() > 1 or (coordinator_address is None and "JAX_COORDINATOR_ADDRESS" not in os.environ):
    return
  if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


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
