"""JAX against PyTorch on the same stage-2 step: alternating timing rounds and profiles of both.

Called by `benchmarks/step_throughput.py` (`--compare-torch`, `--profile`); the torch steps are
`benchmarks/torch_reference.py`'s, built from the same `step_setup.Setup` (networks, weights, batch).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Any

import jax
import torch

from benchmarks import results as results_lib
from benchmarks import torch_reference
from benchmarks.step_setup import Setup, timed_step


def compare_torch(setup: Setup, kind: str, rounds: int, steps: int, warmup: int, torch_threads: int,
                  formulations: tuple[str, ...] = ("naive", "best"), device: str = "cpu") -> dict[str, Any]:
  """JAX against each torch formulation (same networks, weights, batch): "naive" (`TorchStage2`, create_graph=True)
  and "best" (`TorchStage2Best`, our algorithm through torch.func), both on torch `device`; with
  `setup.settings.bf16` the best formulation runs its FR nets, D and R in bfloat16 too (the naive one stays float32).

  Pairwise: each formulation gets its own block of `rounds` rounds, each round `steps` JAX steps then `steps` steps of
  that formulation, and its ratio is against the JAX steps of its own block. Best goes first: a block that also ran
  naive torch in between slowed the JAX steps after it (0.78 against 0.65 s on the 2-core VM, run F), while torch best
  was unaffected, so a three-way round would charge JAX for naive torch's after-effects."""
  torch.set_num_threads(torch_threads)
  dtype = torch.bfloat16 if setup.settings.bf16 else torch.float32
  torch_steps = {f: torch_reference.from_setup(setup, kind, f, device, dtype) for f in formulations}
  host = torch_reference.to_torch_batch(setup.model_batch())
  t_batches = {f: step.prepare(host) for f, step in torch_steps.items()}  # on the device, outside the timed region
  compiled, extra, _ = setup.compiled(2, kind)
  state, batch = setup.state(2), setup.device_batch()

  def torch_step(f):
    start = time.perf_counter()
    torch_steps[f].step(t_batches[f])
    torch_steps[f].synchronize()
    return time.perf_counter() - start

  for _ in range(warmup):
    state, _ = timed_step(compiled, state, batch, extra)
    for f in formulations:
      torch_step(f)
  order = sorted(formulations, key=lambda f: f != "best")
  jax_times, loads = {f: [] for f in order}, []
  torch_times = {f: [] for f in order}
  for f in order:
    for _ in range(rounds):
      loads.append(os.getloadavg()[0])
      for _ in range(steps):
        state, seconds = timed_step(compiled, state, batch, extra)
        jax_times[f].append(seconds)
      torch_times[f].extend(torch_step(f) for _ in range(steps))
  all_jax = [t for f in order for t in jax_times[f]]
  out = {"kind": kind, "jax_median_s": statistics.median(all_jax), "jax_times_s": all_jax,
         "torch_threads": torch_threads, "torch_device": device, "load_avg_1min_per_round": loads,
         "bf16": setup.settings.bf16, "blocks": order}
  for f in order:
    key = "torch" if f == "naive" else f"torch_{f}"
    t, j = torch_times[f], jax_times[f]
    out[f"{key}_median_s"] = statistics.median(t)
    out[f"{key}_jax_median_s"] = statistics.median(j)  # the JAX steps of this formulation's block
    out[f"{key}_over_jax"] = statistics.median(t) / statistics.median(j)
    out[f"{key}_over_jax_per_round"] = [statistics.median(t[i * steps:(i + 1) * steps]) /
                                        statistics.median(j[i * steps:(i + 1) * steps]) for i in range(rounds)]
    out[f"{key}_times_s"] = t
    out[f"{key}_jax_times_s"] = j
  if "best" in torch_steps:
    out["torch_best_adam"] = torch_steps["best"].adam_kind
  # The torch baseline a goal should use: the faster formulation of this run (best-effort is not always faster:
  # at tiny sizes torch.func's per-op overhead outweighs what it saves).
  fastest = min(formulations, key=lambda f: statistics.median(torch_times[f]))
  out["torch_fastest"] = fastest
  out["torch_fastest_over_jax"] = out[("torch" if fastest == "naive" else f"torch_{fastest}") + "_over_jax"]
  return out



def profile_stage2(setup: Setup, kind: str, directory: pathlib.Path, steps: int, torch_formulations: tuple[str, ...],
                   torch_device: str = "cpu", torch_threads: int = 1, top: int = 40) -> dict[str, Any]:
  """Profiles `steps` stage-2 steps of JAX and of each torch formulation (after one warm-up step each).

  Writes `DIR/jax/` (a `jax.profiler` trace: TensorBoard's xplane and a Perfetto `perfetto_trace.json.gz`),
  `DIR/torch_<formulation>.txt` (the torch profiler's `key_averages()` table, top `top` ops by self time) and
  `.json` (every op: name, count, self and total time), and `DIR/profile_meta.json` (steps and the wall seconds of
  each profiled region). `python -m benchmarks.profile_summary DIR` prints the top ops and their share of the step.
  """
  directory.mkdir(parents=True, exist_ok=True)
  compiled, extra, _ = setup.compiled(2, kind)
  state, batch = setup.state(2), setup.device_batch()
  state, _ = timed_step(compiled, state, batch, extra)
  meta = {"kind": kind, "steps": steps, "settings": dataclasses.asdict(setup.settings), "wall_s": {}}
  with jax.profiler.trace(str(directory / "jax"), create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = timed_step(compiled, state, batch, extra)
    meta["wall_s"]["jax"] = time.perf_counter() - start
  if torch_formulations:
    torch.set_num_threads(torch_threads)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch_device.startswith("cuda"):
      activities.append(torch.profiler.ProfilerActivity.CUDA)
    dtype = torch.bfloat16 if setup.settings.bf16 else torch.float32
    for f in torch_formulations:
      step = torch_reference.from_setup(setup, kind, f, torch_device, dtype)
      t_batch = step.prepare(torch_reference.to_torch_batch(setup.model_batch()))
      step.step(t_batch)
      step.synchronize()
      with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
          step.step(t_batch)
        step.synchronize()
        meta["wall_s"][f"torch_{f}"] = time.perf_counter() - start
      averages = prof.key_averages()
      sort = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
      (directory / f"torch_{f}.txt").write_text(averages.table(sort_by=sort, row_limit=top))
      ops = [{"name": e.key, "count": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total,
              "self_device_us": getattr(e, "self_device_time_total", 0.0)} for e in averages]
      results_lib.write_json(directory / f"torch_{f}.json", ops)
  results_lib.write_json(directory / "profile_meta.json", meta)
  return meta
