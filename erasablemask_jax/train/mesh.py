"""Devices and hosts: joining a multi-host run, the `data` mesh built from config, the batch check and where the
train state lives.

One `Mesh` with a `data` axis over `mesh.data` devices (-1: all, over all hosts); the global batch is sharded along it.
The train state is replicated (`mesh.state = "replicated"`), or, with `mesh.state = "sharded"`, each large leaf
(parameters and their Adam moments alike) is split along the data axis as ZeRO-3 / FSDP does (`state_shardings`).
Multi-host runs call `jax.distributed.initialize` first (`initialize_distributed`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from erasablemask_jax.config import MESH_STATES, ConfigError

DATA = "data"
# A leaf smaller than this stays replicated under `mesh.state = "sharded"`: splitting a bias or a BatchNorm statistic
# saves nothing and adds a collective.
MIN_SHARDED_SIZE = 2**16


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


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A 1-D mesh with a `data` axis over `mesh.data` of `devices` (default: every device of every host; -1: all)."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices) if mesh_config.data in (-1, 0) else mesh_config.data
  if n > len(devices):
    raise ConfigError(f"mesh.data={n} but only {len(devices)} devices are visible; set --config.mesh.data=-1 "
                      "(every device) or a smaller count")
  if mesh_config.get("state", "replicated") not in MESH_STATES:
    raise ConfigError(f"mesh.state={mesh_config.state!r}; choose one of {MESH_STATES}")
  return Mesh(np.asarray(devices[:n]), (DATA,))


def check_batch_divides(global_batch: int, mesh: Mesh, processes: int | None = None) -> None:
  """The global batch must split evenly over the mesh's devices and the hosts (default: this run's)."""
  processes = jax.process_count() if processes is None else processes
  if global_batch % mesh.size or global_batch % processes:
    raise ConfigError(f"data.batch_size={global_batch} does not divide over {mesh.size} devices and "
                      f"{processes} hosts; use a multiple of {math.lcm(mesh.size, processes)} "
                      "(--config.data.batch_size=N) or fewer devices (--config.mesh.data=N)")


def leaf_spec(shape: tuple[int, ...], axis_size: int, min_size: int | None = None) -> P:
  """The sharded layout of one state leaf: its largest dimension that `axis_size` divides, split over `data`;
  replicated (`P()`) when the leaf has fewer than `min_size` (default `MIN_SHARDED_SIZE`) elements or no dimension
  divides."""
  min_size = MIN_SHARDED_SIZE if min_size is None else min_size
  if axis_size <= 1 or math.prod(shape) < min_size:
    return P()
  dims = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % axis_size == 0]
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = DATA
  return P(*spec)


def state_shardings(shapes, mesh: Mesh, mesh_config):
  """Where each leaf of the train state `shapes` (its `jax.eval_shape`) lives: one replicated sharding for all
  (`mesh.state = "replicated"`), or a pytree of shardings (`"sharded"`: `leaf_spec` of each leaf, so a parameter and
  its two Adam moments are split alike)."""
  if mesh_config.get("state", "replicated") == "replicated":
    return NamedSharding(mesh, P())
  return jax.tree.map(lambda s: NamedSharding(mesh, leaf_spec(s.shape, mesh.shape[DATA])), shapes)
