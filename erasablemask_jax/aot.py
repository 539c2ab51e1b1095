"""Ahead-of-time compiles of a run's steps for a TPU topology, on a machine without one (`erasablemask compile`).

With `libtpu` installed (`pip install "erasablemask-jax[tpu]"`), `jax.experimental.topologies` describes the devices
of any TPU slice (`v5e:4x4`: 16 chips on 4 hosts), and `jit(...).lower(abstract arguments).compile()` compiles for
them here. `compile_run` builds everything the trainer builds, through the same `train.build` (mesh, shardings, the
jitted stage steps, donation), but from shapes alone:

- the train state: `jax.eval_shape` of its init, placed as `mesh.state` says (`Built.abstract_state`);
- the surrogates: abstract parameters of their architectures (`fr.surrogates.abstract_surrogate`), the architecture
  read from a converted directory's card, or named by `surrogate_archs` where the directories are absent, or else
  guessed from the name the config spells (`fr/ir_152` -> `ir_152`);
- the target embeddings and the batch: shapes and dtypes with the trainer's shardings.

It compiles the three stage steps and the protect / restore functions, and reads from each program XLA's memory
analysis per chip (arguments, outputs, temporaries, donated aliases; total = argument + output + temp - alias), its
cost analysis (FLOPs and bytes accessed per chip) and the collectives in its HLO. The roofline time of a step is the
compiler's estimate where it gives a positive one, else `max(FLOPs / peak, bytes / HBM bandwidth)` with the chip's
published peaks (`CHIPS`; libtpu 0.0.42's `optimal_seconds` is negative); collectives are timed as their bytes over
the chip's ICI bandwidth (an all-reduce moves its bytes twice), a lower bound as the roofline is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from erasablemask_jax.config import ConfigError
from erasablemask_jax.fr import surrogates as surrogates_lib
from erasablemask_jax.inference import run as run_lib
from erasablemask_jax.train import build as build_lib
from erasablemask_jax.train import mesh as mesh_lib

GiB = 2**30
TPU_EXTRA_HINT = ('compiling for a TPU needs libtpu: pip install "erasablemask-jax[tpu]" (from a clone: '
                  'pip install -e ".[tpu]"), which brings the libtpu that matches the installed jax')


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's published peaks (Cloud TPU and NVIDIA data sheets)."""

  name: str
  peak_flops: float  # bf16 dense FLOP/s (float32 matmuls run on the MXU in bf16 passes at default precision)
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s per chip, one direction (0: not modelled)
  chip_config: str = "default"  # "megacore": one JAX device per chip of two TensorCores (v4, v5p)


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, 300e9, "megacore"),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, 200e9),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, 600e9, "megacore"),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, 448e9),
}
# No GPU compile happens here: these give estimates from a TPU program's FLOPs and bytes.
GPUS = {
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * 10**9, 3350e9, 0.0),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141 * 10**9, 4800e9, 0.0),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


class LibtpuMissing(RuntimeError):
  """libtpu is not installed; the message says how to get it."""


def chip_of(topology: str) -> Chip:
  """The chip of a topology name `GEN:SHAPE` (`v5e:4x4`, `v4:2x2x2`, `v5p:2x2x1`, `v6e:2x4`; `v5` means v5p)."""
  generation = topology.partition(":")[0].lower()
  generation = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e"}.get(generation, generation)
  if generation not in CHIPS or ":" not in topology:
    raise ConfigError(f"unknown TPU topology {topology!r}; write GENERATION:SHAPE with GENERATION one of "
                      f"{', '.join(CHIPS)}, e.g. v5e:4x4 (16 chips) or v4:2x2x2")
  return CHIPS[generation]


def quiet_libtpu(topology: str) -> None:
  """Without a TPU to find, libtpu warns that it "could not determine TPU accelerator type / worker hostnames" (and
  fails to find host bounds for an unknown type); name the slice being compiled for and a local worker instead, and
  allow other compiling processes (values a user set are kept). Read once, when libtpu starts."""
  generation, _, shape = topology.lower().partition(":")
  chips = math.prod(int(n) for n in shape.split("x") if n.isdigit()) or 1
  generation = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e"}.get(generation, generation)
  name = {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}", "v5e": f"v5litepod-{chips}"}.get(generation,
                                                                                               f"{generation}-{chips}")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # No chip is opened, so compiles in several processes at once are safe (else libtpu's lockfile refuses the second).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def keep_host_on_cpu() -> None:
  """Keeps this process's own jax backend on the CPU unless $JAX_PLATFORMS names one: compiling for a TPU topology
  needs no TPU backend, and without this libtpu starts and looks for a chip. jax reads the variable when it is
  imported, so this sets its config instead (before any backend starts)."""
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of `num_slices` slices of `topology` (one device per chip; four chips per host).

  Raises:
    LibtpuMissing: libtpu is not installed.
    ConfigError: an unknown topology name.
  """
  chip = chip_of(topology)
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise LibtpuMissing(TPU_EXTRA_HINT) from None
  quiet_libtpu(topology)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  name = topology.split(":", 1)
  generation = {"v5p": "v5"}.get(name[0].lower(), name[0].lower())
  try:
    desc = topologies.get_topology_desc(topology_name=f"{generation}:{name[1]}", platform="tpu",
                                        chip_config_name=chip.chip_config, chips_per_host_bounds=(2, 2, 1),
                                        num_slices=num_slices)
  except Exception as e:  # libtpu's errors are JaxRuntimeError / RuntimeError with its own text
    raise ConfigError(f"libtpu cannot describe topology {topology!r} x{num_slices}: {str(e).splitlines()[0]}") from None
  return list(desc.devices)


# ---------------------------------------------------------------------------------------------------------------------
# What a compiled program says.

def memory_bytes(compiled) -> dict[str, int]:
  """XLA's buffer assignment per chip: `argument`, `output`, `temp`, `alias` (donated arguments reused as outputs),
  `generated_code`, and `total = argument + output + temp - alias`."""
  m = compiled.memory_analysis()
  out = {f: int(getattr(m, f"{f}_size_in_bytes", 0) or 0)
         for f in ("argument", "output", "temp", "alias", "generated_code")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def cost(compiled) -> dict[str, float]:
  """`flops`, `bytes_accessed` and the compiler's `optimal_seconds` of one call, per chip (NaN where absent)."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  c = c or {}
  return {"flops": float(c.get("flops", math.nan)), "bytes_accessed": float(c.get("bytes accessed", math.nan)),
          "optimal_seconds": float(c.get("optimal_seconds", math.nan))}


def _shape_bytes(text: str) -> int:
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text))


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """The collectives of an optimised HLO module: `[{"op", "count", "bytes"}]`, bytes summed over each op's result
  shapes (per chip); asynchronous pairs count once (their `-start`, whose result holds the operands too, except an
  all-reduce's)."""
  found: dict[str, list[int]] = {}
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if m:
      shape = m.group(1)
      if m.group(3) and m.group(2) != "all-reduce":  # (operands, results[, scratch]): keep the results
        parts = re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", shape)
        shape = " ".join(parts[len(parts) // 2:]) if len(parts) > 1 else shape
      entry = found.setdefault(m.group(2), [0, 0])
      entry[0] += 1
      entry[1] += _shape_bytes(shape)
  return [{"op": op, "count": n, "bytes": b} for op, (n, b) in sorted(found.items())]


def roofline(costs: dict[str, float], chip: Chip) -> tuple[float, str]:
  """`(seconds, source)`: the compiler's positive `optimal_seconds`, else `max(FLOPs / peak, bytes / bandwidth)`."""
  if costs["optimal_seconds"] > 0:
    return costs["optimal_seconds"], "compiler"
  return max(costs["flops"] / chip.peak_flops, costs["bytes_accessed"] / chip.hbm_bandwidth), "flops_bytes_over_peaks"


def collective_seconds(found: Sequence[dict[str, Any]], chip: Chip) -> float:
  """A lower bound of the time in collectives: bytes over the chip's ICI bandwidth (an all-reduce's twice)."""
  if not chip.ici_bandwidth:
    return math.nan
  return sum(c["bytes"] * (2 if c["op"] == "all-reduce" else 1) for c in found) / chip.ici_bandwidth


def analyse(compiled, chip: Chip) -> dict[str, Any]:
  """One program's figures (the `stages` entries of `compile_run`)."""
  memory, costs = memory_bytes(compiled), cost(compiled)
  seconds, source = roofline(costs, chip)
  found = collectives(compiled.as_text())
  coll_s = collective_seconds(found, chip)
  return {"per_chip_bytes": {k: memory[k] for k in ("argument", "output", "temp", "alias", "total")},
          "generated_code_bytes": memory["generated_code"], "chip_bytes": chip.hbm_bytes,
          "fits": memory["total"] <= chip.hbm_bytes, "flops": costs["flops"],
          "bytes_accessed": costs["bytes_accessed"], "roofline_s": seconds, "roofline_source": source,
          "compiler_optimal_seconds": costs["optimal_seconds"], "collectives": found,
          "collective_s": coll_s, "collective_share": coll_s / (seconds + coll_s) if seconds + coll_s > 0 else 0.0}


def fit_advice(stage: dict[str, Any], config: ml_collections.ConfigDict, chips: int) -> str:
  """One line for a step that does not fit: what would make it fit."""
  m = stage["per_chip_bytes"]
  per_chip_batch = config.data.batch_size // chips
  over = m["total"] - stage["chip_bytes"]
  parts = [f"stage {stage['stage']} needs {m['total'] / GiB:.1f} GiB per chip, {over / GiB:.1f} GiB over the "
           f"{stage['chip_bytes'] / GiB:.0f} GiB of a chip"]
  if config.mesh.get("state", "replicated") == "replicated" and m["argument"] > 0.25 * stage["chip_bytes"]:
    parts.append("shard the state over the chips (--config.mesh.state=sharded)")
  if per_chip_batch > 1:
    parts.append(f"lower the per-chip batch from {per_chip_batch} (--config.data.batch_size) or use more chips")
  parts.append("or rematerialise activations (attack.primaries=scan keeps one surrogate's at a time)")
  return "; ".join(parts[:1]) + ": " + ", ".join(parts[1:])


# ---------------------------------------------------------------------------------------------------------------------
# Compiling a run.

def abstract_surrogates(config: ml_collections.ConfigDict, archs: Sequence[str] | None = None):
  """`(surrogates, notes)`: `config.fr.surrogates` with abstract variables; `notes` says where each architecture
  came from (its card, `archs`, or the name the config spells)."""
  specs = list(config.fr.surrogates)
  if archs and len(archs) != len(specs):
    raise ConfigError(f"--surrogate-archs names {len(archs)} architectures for {len(specs)} surrogates "
                      f"({', '.join(specs)}); give one per surrogate, in order")
  from erasablemask_jax import convert  # pylint: disable=import-outside-toplevel

  out, notes = [], []
  for i, spec in enumerate(specs):
    card_arch = surrogates_lib.surrogate_arch(spec)
    if archs:
      arch, why = archs[i], "--surrogate-archs"
    elif card_arch:
      arch, why = card_arch, "its card"
    else:
      arch = spec.partition("@")[0].rstrip("/").rsplit("/", 1)[-1]
      why = "the name the config spells (the directory is absent; --surrogate-archs names it otherwise)"
    if arch not in convert.list_archs():
      raise ConfigError(f"surrogate {spec!r}: no architecture {arch!r} (from {why}); name one with "
                        f"--surrogate-archs, from: {', '.join(convert.list_archs())}")
    out.append(surrogates_lib.abstract_surrogate(spec, arch, config.fr.input_crop, config.image_size,
                                                 config.fr.get("fold_batchnorm", False)))
    notes.append(f"{spec}: {arch} (from {why})")
  return out, notes


def programs(config: ml_collections.ConfigDict, devices: Sequence[Any], processes: int,
             archs: Sequence[str] | None = None):
  """`(built, notes, {name: (jitted, abstract args)})` of the three stage steps and protect / restore, from shapes."""
  surrogates, notes = abstract_surrogates(config, archs)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  built = build_lib.build(config, mesh, [s.apply for s in surrogates], processes=processes)
  state, batch = built.abstract_state(), built.abstract_batch()
  fr_vars = built.place_replicated([s.variables for s in surrogates])
  targets = built.place_replicated([jax.ShapeDtypeStruct((s.recogniser.embedding_size,), np.float32)
                                    for s in surrogates])
  image = jax.ShapeDtypeStruct(batch["image"].shape, np.float32, sharding=built.batch_sharding)
  nets = {name: getattr(state, name).variables for name in ("g", "e_adv", "r")}
  protect = jax.jit(functools.partial(run_lib.protect_images, built.models))  # as `inference.Run` jits them
  restore = jax.jit(functools.partial(run_lib.restore_images, built.models))
  return built, notes, {
      **{str(stage): (built.step(stage), (state, batch, *build_lib.extra_args(stage, fr_vars, targets)))
         for stage in (1, 2, 3)},
      "protect": (protect, (nets["g"], nets["e_adv"], image, batch["att_b"])),
      "restore": (restore, (nets["r"], image, batch["att_a"])),
  }


def compile_run(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
                archs: Sequence[str] | None = None, only: Sequence[str] = ("1", "2", "3", "protect", "restore"),
                done: dict[str, dict] | None = None,
                on_result: Callable[[dict[str, Any]], None] | None = None,
                effort: float = 0.0) -> dict[str, Any]:
  """Compiles `config`'s programs for `num_slices` slices of `topology` and returns the report:

  `{"topology", "num_slices", "chip", "chips", "hosts", "surrogates", "stages": [{"stage", "per_chip_bytes":
  {argument, output, temp, alias, total}, "chip_bytes", "fits", "flops", "bytes_accessed", "roofline_s",
  "roofline_source", "collectives": [{op, count, bytes}], "compile_s", ...}], "functions": [the same for protect and
  restore]}`, each program with its `compile_effort`. `done` holds results of an earlier, interrupted call (by program
  name), kept rather than recompiled; `on_result(report)` is called after each program, so a caller can write the
  report as it grows.

  `effort` is XLA's `exec_time_optimization_effort` in [-1, 1] (0: the compiler's default). At -1 the TPU compiler
  trades step time for compile time: on this 2-core CPU the demo config's stage 2 for v5e:2x2 compiled in 175 s
  instead of 361 s, with per-chip memory 0.252 vs 0.267 GiB, FLOPs within 0.4% and a roofline 11% longer (stage 3:
  26 vs 53 s, 0.133 vs 0.102 GiB); the paper's stage 2 for v5e:4x4 in 227 s instead of 935 s, at 4.56 instead of
  5.16 GiB per chip (memory can come out lower, not only higher). Each program's entry records it, so its figures
  read as a quicker compile's.
  """
  if not -1.0 <= effort <= 1.0:
    raise ConfigError(f"compile effort {effort} is outside [-1, 1] (XLA's exec_time_optimization_effort; -1 compiles "
                      "fastest, 0 is the default)")
  chip = chip_of(topology)
  devices = topology_devices(topology, num_slices)
  hosts = len({d.process_index for d in devices})
  _, notes, progs = programs(config, devices, hosts, archs)
  report = {"topology": topology, "num_slices": num_slices, "chip": chip.name, "chips": len(devices), "hosts": hosts,
            "global_batch": config.data.batch_size, "mesh_state": config.mesh.get("state", "replicated"),
            "surrogates": notes, "stages": [], "functions": []}
  options = {"exec_time_optimization_effort": effort} if effort else None
  done = dict(done or {})
  # Programs compiled earlier stay in the report beside those asked for now (a partial rerun never drops them).
  for name in [n for n in ("1", "2", "3", "protect", "restore") if n in only or n in done]:
    if name in done:
      result = done[name]
    else:
      fn, args = progs[name]
      start = time.perf_counter()
      compiled = fn.lower(*args).compile(compiler_options=options)
      result = {"compile_s": time.perf_counter() - start, "compile_effort": effort, **analyse(compiled, chip)}
      result = {"stage": int(name)} | result if name.isdigit() else {"function": name} | result
    (report["stages"] if name.isdigit() else report["functions"]).append(result)
    if on_result is not None:
      on_result(report)
  return report
