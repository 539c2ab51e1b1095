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
