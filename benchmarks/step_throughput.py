"""Training-step throughput of each curriculum step, the cost of each attack variant, and the machine's utilisation.

For stage 1, stage 2 with the meta-auxiliary attack (exact second order), its first-order variant and the ensemble
ablation, and stage 3, each step jitted exactly as `erasablemask_jax.train.trainer` does (replicated state, batch
sharded over a `data` mesh axis, state donated), measures:

  compile time       `jit(step).lower(...).compile()` wall time
  step time          median of `--steps` timed steps after `--warmup` steps, each `block_until_ready`
  images/s           global batch / median step time
  FLOPs per step     XLA's `compiled.cost_analysis()["flops"]` (of the per-device program)
  achieved FLOP/s    FLOPs / median step time, and its fraction of the peak measured in the same run by a large
                     matrix product (`--matmul` x `--matmul`, best of 5)
  memory             device `memory_stats()["peak_bytes_in_use"]` on GPU/TPU, the process's peak RSS on CPU (both
                     cumulative over the run), and XLA's temp buffer size of the step's program

and reports the second-order step's time relative to the first-order and ensemble steps beside the ratio their FLOP
counts predict (a measured ratio more than 1.3x the predicted one means waste in the second-order program).

`--compare-torch` also runs the same stage-2 step in PyTorch eager (`benchmarks/torch_reference.py`: same networks,
weights and batch), alternating JAX and torch rounds so that both see the same machine load, and reports the ratio.

    python -m benchmarks.step_throughput --image-size 128 --batch 4 --width 16 --compare-torch
    python -m benchmarks.step_throughput --devices 4 --stages 2:meta_auxiliary   # simulated devices on CPU

Surrogates (`--fr`, comma-separated, K = their number or `--k`): `bundled:mobilefacenet` (the bundled weights),
`random:ARCH` (random weights of any zoo architecture, e.g. `random:iresnet50`), each optionally `@flip` (the mirrored
view, a different function of the image). With `--k` larger than the list, the list is cycled, alternating the view.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import tiny_fr
from configs import default as default_config
from erasablemask_jax import fr
from erasablemask_jax.attack import make_attack
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import steps as steps_lib
from erasablemask_jax.train.state import begin_stage2, create_train_state, make_optimizer
from erasablemask_jax.fr.surrogates import Surrogate, load_surrogate, target_embeddings

STAGES = ("1", "2:meta_auxiliary", "2:first_order", "2:ensemble", "3")
KINDS = ("meta_auxiliary", "first_order", "ensemble")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a benchmark run builds. Widths apply to E_adv/G/R (`enc_dim`, `dec_dim`) and D (`dis_dim`)."""

  image_size: int = 128
  batch: int = 4
  width: int = 16
  layers: int = 5
  max_dim: int = 1024
  fc_dim: int = 256
  fr: tuple[str, ...] = ("bundled:mobilefacenet", "bundled:mobilefacenet@flip")
  k: int = 0  # 0: len(fr)
  lr_inner: float | None = None  # None: config.attack.lr_inner (the optimiser's learning rate)
  primaries: str = "unrolled"
  noise: bool = False  # the config's training noise pool on x_adv (off: identity, as the torch reference)
  devices: int = 1
  seed: int = 0
  bf16: bool = False  # FR surrogates, D and R compute in bfloat16; E_adv, G and the inner step stay float32
  fold_bn: bool = True  # the frozen FR nets' BatchNorms folded into their convolutions (config.fr.fold_batchnorm)


def make_config(s: Settings):
  """configs/default.py with the benchmark's sizes."""
  config = default_config.get_config()
  config.image_size = s.image_size
  m = config.model
  m.enc_dim = m.dec_dim = m.dis_dim = s.width
  m.enc_layers = m.dec_layers = m.dis_layers = s.layers
  m.max_dim, m.dis_fc_dim = s.max_dim, s.fc_dim
  config.data.batch_size = s.batch
  config.mesh.data = s.devices
  if not s.noise:
    config.noise.train_pool = ("identity",)
  if s.lr_inner is not None:
    config.attack.lr_inner = s.lr_inner
  return config


def surrogate_specs(s: Settings) -> list[str]:
  """`s.fr`, or `s.k` entries cycling through it with the view toggled on every other lap."""
  k = s.k or len(s.fr)
  out = []
  for i in range(k):
    spec = s.fr[i % len(s.fr)]
    if (i // len(s.fr)) % 2 == 1:
      spec = spec.removesuffix("@flip") if spec.endswith("@flip") else spec + "@flip"
    out.append(spec)
  return out


def _flipped(apply_fn, variables, x):
  return apply_fn(variables, x[:, :, ::-1, :])


def make_surrogate(spec: str, seed: int) -> Surrogate:
  """`bundled:NAME[@flip]`, `random:ARCH[@flip]` (random weights of a registered zoo architecture) or `tiny[@flip]`
  (the 16x16 two-conv net of `benchmarks/tiny_fr.py`, for tests of this script)."""
  source, _, view = spec.partition("@")
  if source == "tiny":
    recogniser = tiny_fr.tiny_surrogates(1, seed=seed)[0].recogniser
    apply = recogniser.apply_fn if view != "flip" else functools.partial(_flipped, recogniser.apply_fn)
    return Surrogate(spec=spec, recogniser=recogniser, apply=apply)
  if not source.startswith("random:"):
    return load_surrogate(spec)
  from erasablemask_jax import convert  # pylint: disable=g-import-not-at-top

  arch = source.removeprefix("random:")
  arch_spec = convert.get_arch(arch)
  variables = arch_spec.build().init(jax.random.key(seed), jnp.zeros((1, *arch_spec.input_shape), jnp.float32))
  recogniser = fr.from_variables(arch, variables)
  apply = recogniser.apply_fn if view != "flip" else functools.partial(_flipped, recogniser.apply_fn)
  return Surrogate(spec=spec, recogniser=recogniser, apply=apply)


def bf16_models(models: ErasableMask) -> ErasableMask:
  """`models` with D and R computing in bfloat16 (float32 parameters); G and E_adv unchanged (float32)."""
  return dataclasses.replace(models, discriminator=models.discriminator.clone(dtype=jnp.bfloat16),
                             restorer=models.restorer.clone(dtype=jnp.bfloat16))


def rebuilt_surrogate(surrogate: Surrogate, net_apply=None, dtype=jnp.float32) -> Surrogate:
  """`surrogate` (its view: plain or `@flip`) with the network applied by `net_apply(variables, x)` (default: the
  module's own) in `dtype` (preprocessing and the normalised embedding stay float32). With bfloat16 the caller casts
  the variables once, outside the step (`cast_floats`)."""
  recogniser, flip = surrogate.recogniser, surrogate.spec.endswith("@flip")
  net_apply = net_apply or recogniser.module.apply

  def apply(variables, x):
    x = x[:, :, ::-1, :] if flip else x
    h = fr.preprocess(x, recogniser.preprocessing).astype(dtype)
    return fr.l2_normalise(net_apply(variables, h).astype(jnp.float32))

  return dataclasses.replace(surrogate, apply=apply)


def cast_floats(tree, dtype):
  """Every floating-point leaf of `tree` cast to `dtype`."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _capture_grads() -> optax.GradientTransformation:
  """An identity transformation whose state is the last gradient (to read a step's raw gradients)."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


class Setup:
  """Networks, surrogates, targets, the mesh and the jitted steps of one benchmark configuration."""

  def __init__(self, settings: Settings, surrogates: list[Surrogate] | None = None):
    """Builds everything for `settings`; `surrogates` replaces the ones `settings.fr` names (e.g. tiny test nets)."""
    self.settings = s = settings
    self.config = make_config(s)
    self.lr_inner = self.config.attack.lr_inner
    self.num_attributes = len(self.config.attributes)
    self.models = ErasableMask.from_config(self.config.model, self.num_attributes)
    if s.bf16:
      self.models = bf16_models(self.models)
    self.tx = make_optimizer(self.config.optim)
    devices = jax.devices()
    if s.devices > len(devices):
      raise ValueError(f"--devices {s.devices} but only {len(devices)} devices are visible")
    if s.batch % s.devices:
      raise ValueError(f"--batch {s.batch} does not divide over {s.devices} devices")
    self.mesh = Mesh(np.asarray(devices[:s.devices]), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.surrogates = surrogates if surrogates is not None else [
        make_surrogate(spec, s.seed + i) for i, spec in enumerate(surrogate_specs(s))]
    rng = np.random.default_rng(s.seed + 1)
    target = jnp.asarray(rng.uniform(-1, 1, (1, s.image_size, s.image_size, 3)), jnp.float32)
    self.targets = jax.device_put(target_embeddings(self.surrogates, target), self.replicated)
    self.fr_vars = jax.device_put([x.variables for x in self.surrogates], self.replicated)
    if s.fold_bn or s.bf16:
      fr_vars, rebuilt = [], []
      for x in self.surrogates:
        variables, net_apply = x.variables, None
        if s.fold_bn:  # as the trainer's load_surrogate(fold_batchnorm=True); x keeps the unfolded net for torch
          folded = x.recogniser.fold_batchnorm()
          variables, net_apply = folded.variables, folded.net_apply
        fr_vars.append(cast_floats(variables, jnp.bfloat16) if s.bf16 else variables)
        rebuilt.append(rebuilt_surrogate(x, net_apply, jnp.bfloat16 if s.bf16 else jnp.float32))
      self.surrogates = rebuilt
      self.fr_vars = jax.device_put(fr_vars, self.replicated)
    self._compiled = {}
    self.noise = None
    if s.noise:
      from erasablemask_jax.noise import make_train_pool  # pylint: disable=g-import-not-at-top
      self.noise = make_train_pool(tuple(self.config.noise.train_pool))

  # -------------------------------------------------------------------------------------------------------------------
  def host_batch(self) -> dict[str, np.ndarray]:
    """A deterministic batch: smooth random images in [-1, 1] and random 0/1 attributes (att_b flips some)."""
    s = self.settings
    rng = np.random.default_rng(s.seed + 2)
    yy, xx = np.mgrid[:s.image_size, :s.image_size] / s.image_size
    base = np.stack([yy, xx, 1 - yy], -1)[None] * rng.uniform(0.3, 1.0, (s.batch, 1, 1, 3))
    image = np.clip(2 * base - 1 + rng.normal(0, 0.1, (s.batch, s.image_size, s.image_size, 3)), -1, 1)
    att_a = (rng.random((s.batch, self.num_attributes)) < 0.5).astype(np.float32)
    att_b = np.where(rng.random(att_a.shape) < 0.3, 1 - att_a, att_a).astype(np.float32)
    return {"image": image.astype(np.float32), "att_a": att_a, "att_b": att_b}

  def device_batch(self) -> dict[str, jax.Array]:
    return jax.device_put(self.host_batch(), self.batch_sharding)

  def _init(self, tx, stage: int):
    state = create_train_state(self.models, tx, jax.random.key(self.settings.seed), self.config.image_size,
                               self.num_attributes, len(self.surrogates))
    if stage >= 2:
      state = begin_stage2(state, tx)
      # As after some stage-2 training: E_adv no longer equals G_enc (else x_adv == x_edit exactly).
      leaves, tree = jax.tree.flatten(state.e_adv.params)
      keys = jax.random.split(jax.random.key(self.settings.seed + 3), len(leaves))
      leaves = [a * (1.0 + 0.1 * jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys)]
      state = state.replace(e_adv=state.e_adv.replace(params=jax.tree.unflatten(tree, leaves)))
    return state

  def state(self, stage: int, tx=None):
    """A fresh train state for `stage` (stage >= 2: after `begin_stage2`), replicated on the mesh."""
    return jax.jit(functools.partial(self._init, tx or self.tx, stage), out_shardings=self.replicated)()

  def stage2_state(self):
    return self.state(2)

  def step_config(self, kind: str | None, tx=None) -> steps_lib.StepConfig:
    attack = make_attack(kind, lr_inner=self.lr_inner, epsilon=self.config.loss.epsilon,
                         primaries=self.settings.primaries) if kind else None
    return steps_lib.StepConfig(models=self.models, tx=tx or self.tx, loss=self.config.loss,
                                fr_applies=tuple(x.apply for x in self.surrogates) if kind else (), attack=attack,
                                noise=self.noise)

  def jitted(self, stage: int, kind: str | None = None, tx=None):
    """`(jitted_step, extra_args)` as the trainer jits it: replicated state, sharded batch, donated state."""
    fn = {1: steps_lib.stage1_step, 2: steps_lib.stage2_step, 3: steps_lib.stage3_step}[stage]
    extra = (self.fr_vars, self.targets) if stage == 2 else ()
    step = jax.jit(functools.partial(fn, self.step_config(kind if stage == 2 else None, tx)),
                   in_shardings=(self.replicated, self.batch_sharding) + (self.replicated,) * len(extra),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
    return step, extra

  def compiled(self, stage: int, kind: str | None = None):
    """`(compiled_step, extra_args, compile_seconds)`, compiled once per (stage, kind) and cached."""
    key = (stage, kind if stage == 2 else None)
    if key not in self._compiled:
      step, extra = self.jitted(stage, kind)
      start = time.perf_counter()
      compiled = step.lower(self.state(stage), self.device_batch(), *extra).compile()
      self._compiled[key] = (compiled, extra, time.perf_counter() - start)
    return self._compiled[key]

  def cold_compile_seconds(self, stage: int, kind: str | None = None) -> float:
    """Wall time of lowering and compiling the step again with the persistent compilation cache off (a cold
    compile, whatever `JAX_COMPILATION_CACHE_DIR` holds)."""
    step, extra = self.jitted(stage, kind)
    args = (self.state(stage), self.device_batch(), *extra)
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
      start = time.perf_counter()
      step.lower(*args).compile()
      return time.perf_counter() - start
    finally:
      jax.config.update("jax_enable_compilation_cache", enabled)

  def stage2_with_grads(self, kind: str, batch: dict[str, np.ndarray]):
    """One stage-2 step from `stage2_state()` on `batch`; returns `(metrics, {net: raw grads}, new_state)`."""
    tx = optax.chain(_capture_grads(), self.tx)
    step, extra = self.jitted(2, kind, tx)
    state, metrics = step(self.state(2, tx), jax.device_put(batch, self.batch_sharding), *extra)
    grads = {net: jax.device_get(getattr(state, net).opt_state[0]) for net in ("d", "e_adv", "r")}
    return jax.device_get(metrics), grads, state


# ---------------------------------------------------------------------------------------------------------------------
# Measurements.

def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def peak_memory_bytes() -> dict[str, float]:
  """Device peak bytes in use (GPU/TPU) or this process's peak RSS (CPU); both cumulative over the run."""
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    return {"device_peak_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20}
  return {"rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def measure_matmul_peak(n: int, dtype=jnp.float32, repeats: int = 5) -> dict[str, float]:
  """Best FLOP/s of an `n x n @ n x n` product on the first device (2 n^3 FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - start)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "best_s": min(times), "flops_per_s": 2 * n**3 / min(times)}


def _timed_step(compiled, state, batch, extra) -> tuple[Any, float]:
  """One step, blocked until its state and metrics are ready; `(new_state, seconds)`."""
  start = time.perf_counter()
  state, metrics = compiled(state, batch, *extra)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def memory_analysis(compiled) -> dict[str, float]:
  """XLA's buffer assignment of a compiled program, in MiB: arguments, outputs, temporaries, aliased (donated)
  bytes, generated code, and XLA's own peak estimate where the backend reports one."""
  m = compiled.memory_analysis()
  fields = ("argument", "output", "temp", "alias", "generated_code")
  out = {f"{f}_mib": getattr(m, f"{f}_size_in_bytes", float("nan")) / 2**20 for f in fields}
  peak = getattr(m, "peak_memory_in_bytes", 0)
  if peak:
    out["peak_mib"] = peak / 2**20
  return out


def measure_step(setup: Setup, stage: int, kind: str | None, warmup: int, steps: int,
                 cold_compile: bool = False) -> dict[str, Any]:
  """Compile time (and, with `cold_compile`, a cold one), XLA's memory analysis, FLOPs, peak memory and
  steady-state times of one step (state donated between steps)."""
  load_before = os.getloadavg()
  compiled, extra, compile_s = setup.compiled(stage, kind)
  cold = {"compile_cold_s": setup.cold_compile_seconds(stage, kind)} if cold_compile else {}
  state = setup.state(stage)
  batch = setup.device_batch()
  memory = memory_analysis(compiled)
  for _ in range(warmup):
    state, _ = _timed_step(compiled, state, batch, extra)
  times = []
  for _ in range(steps):
    state, seconds = _timed_step(compiled, state, batch, extra)
    times.append(seconds)
  flops = _flops(compiled)
  median = statistics.median(times)
  return {"stage": stage, "kind": kind, "compile_s": compile_s, **cold, "median_s": median, "min_s": min(times),
          "times_s": times, "images_per_s": setup.settings.batch / median, "flops": flops,
          "flops_per_s": flops * setup.settings.devices / median,
          "xla_temp_mib": memory["temp_mib"], "xla_memory": memory, **peak_memory_bytes(),
          "compilation_cache": bool(jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache),
          "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def measure_interleaved(setup: Setup, kinds: list[str], rounds: int, steps: int) -> dict[str, Any]:
  """Steady-state times of the stage-2 `kinds` in alternating rounds (`steps` of each kind per round).

  Their ratios are what the goals compare; alternating puts every kind under the same machine load (a shared CPU
  drifts by tens of percent between the sequential rows above).
  """
  programs = {kind: setup.compiled(2, kind)[:2] for kind in kinds}
  states = {kind: setup.state(2) for kind in kinds}
  batch = setup.device_batch()
  times = {kind: [] for kind in kinds}

  def run(kind):
    compiled, extra = programs[kind]
    states[kind], seconds = _timed_step(compiled, states[kind], batch, extra)
    return seconds

  for kind in kinds:  # one warm-up step each
    run(kind)
  for _ in range(rounds):
    for kind in kinds:
      times[kind].extend(run(kind) for _ in range(steps))
  return {"rounds": rounds, "steps": steps, "times_s": times,
          "median_s": {kind: statistics.median(t) for kind, t in times.items()}}


def compare_torch(setup: Setup, kind: str, rounds: int, steps: int, warmup: int, torch_threads: int,
                  formulations: tuple[str, ...] = ("naive", "best"), device: str = "cpu") -> dict[str, Any]:
  """JAX against each torch formulation (same networks, weights, batch): "naive" (`TorchStage2`, create_graph=True)
  and "best" (`TorchStage2Best`, our algorithm through torch.func), both on torch `device`; with
  `setup.settings.bf16` the best formulation runs its FR nets, D and R in bfloat16 too (the naive one stays float32).

  Pairwise: each formulation gets its own block of `rounds` rounds, each round `steps` JAX steps then `steps` steps of
  that formulation, and its ratio is against the JAX steps of its own block. Best goes first: a block that also ran
  naive torch in between slowed the JAX steps after it (0.78 against 0.65 s on the 2-core VM, run F), while torch best
  was unaffected, so a three-way round would charge JAX for naive torch's after-effects."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  (torch is optional)

  torch.set_num_threads(torch_threads)
  dtype = torch.bfloat16 if setup.settings.bf16 else torch.float32
  torch_steps = {f: torch_reference.from_setup(setup, kind, f, device, dtype) for f in formulations}
  host = torch_reference.to_torch_batch(setup.host_batch())
  t_batches = {f: step.prepare(host) for f, step in torch_steps.items()}  # on the device, outside the timed region
  compiled, extra, _ = setup.compiled(2, kind)
  state, batch = setup.state(2), setup.device_batch()

  def torch_step(f):
    start = time.perf_counter()
    torch_steps[f].step(t_batches[f])
    torch_steps[f].synchronize()
    return time.perf_counter() - start

  for _ in range(warmup):
    state, _ = _timed_step(compiled, state, batch, extra)
    for f in formulations:
      torch_step(f)
  order = sorted(formulations, key=lambda f: f != "best")
  jax_times, loads = {f: [] for f in order}, []
  torch_times = {f: [] for f in order}
  for f in order:
    for _ in range(rounds):
      loads.append(os.getloadavg()[0])
      for _ in range(steps):
        state, seconds = _timed_step(compiled, state, batch, extra)
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


VARIANTS = {
    "linearize": {"primaries": "linearize"},
    "vmap": {"primaries": "vmap"},
    "scan": {"primaries": "scan"},
    "fold_bn": {"fold_bn": True},
    "unfold_bn": {"fold_bn": False},
    "bf16": {"bf16": True},
}


def compare_variants(setup: Setup, names: list[str], rounds: int, steps: int) -> dict[str, Any]:
  """The stage-2 meta-auxiliary step of `setup` and of each variant (`VARIANTS`: another `--primaries`, folded
  BatchNorm, bf16) in alternating rounds of `steps` steps; each variant's median and its time over the base's."""
  setups = {"base": setup, **{n: Setup(dataclasses.replace(setup.settings, **VARIANTS[n])) for n in names}}
  programs = {n: x.compiled(2, "meta_auxiliary") for n, x in setups.items()}
  states = {n: x.state(2) for n, x in setups.items()}
  batches = {n: x.device_batch() for n, x in setups.items()}
  times = {n: [] for n in setups}

  def run(n):
    compiled, extra, _ = programs[n]
    states[n], seconds = _timed_step(compiled, states[n], batches[n], extra)
    return seconds

  for n in setups:
    run(n)
  for _ in range(rounds):
    for n in setups:
      times[n].extend(run(n) for _ in range(steps))
  medians = {n: statistics.median(t) for n, t in times.items()}
  return {"rounds": rounds, "steps": steps, "times_s": times, "median_s": medians,
          "over_base": {n: medians[n] / medians["base"] for n in names},
          "compile_s": {n: p[2] for n, p in programs.items()},
          "flops": {n: _flops(p[0]) for n, p in programs.items()},
          "xla_memory": {n: memory_analysis(p[0]) for n, p in programs.items()}}


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
  state, _ = _timed_step(compiled, state, batch, extra)
  meta = {"kind": kind, "steps": steps, "settings": dataclasses.asdict(setup.settings), "wall_s": {}}
  with jax.profiler.trace(str(directory / "jax"), create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = _timed_step(compiled, state, batch, extra)
    meta["wall_s"]["jax"] = time.perf_counter() - start
  if torch_formulations:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  (torch is optional)

    torch.set_num_threads(torch_threads)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch_device.startswith("cuda"):
      activities.append(torch.profiler.ProfilerActivity.CUDA)
    dtype = torch.bfloat16 if setup.settings.bf16 else torch.float32
    for f in torch_formulations:
      step = torch_reference.from_setup(setup, kind, f, torch_device, dtype)
      t_batch = step.prepare(torch_reference.to_torch_batch(setup.host_batch()))
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
      (directory / f"torch_{f}.json").write_text(json.dumps(ops, indent=1))
  (directory / "profile_meta.json").write_text(json.dumps(meta, indent=1))
  return meta


def versions() -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    out["torch"] = torch.__version__
  except ImportError:
    pass
  return out


def _ratio(rows: dict[str, dict], a: str, b: str, interleaved: dict[str, Any] | None = None) -> dict[str, float] | None:
  """Time and FLOP ratios of rows `a` and `b`; the time ratio from the interleaved medians when both were measured."""
  if a not in rows or b not in rows:
    return None
  medians = (interleaved or {}).get("median_s", {})
  ka, kb = a.partition(":")[2], b.partition(":")[2]
  both = ka in medians and kb in medians
  time_ratio = medians[ka] / medians[kb] if both else rows[a]["median_s"] / rows[b]["median_s"]
  flop_ratio = rows[a]["flops"] / rows[b]["flops"]
  return {"time_ratio": time_ratio, "flop_ratio": flop_ratio, "time_over_flop_prediction": time_ratio / flop_ratio,
          "timing": "interleaved" if both else "sequential",
          "sequential_time_ratio": rows[a]["median_s"] / rows[b]["median_s"]}


def _row_name(stage: int, kind: str | None) -> str:
  return f"stage{stage}" + (f":{kind}" if kind else "")


def _write(path, args, settings, setup, device, peak, peak_bf16, rows, ratios, torch_results) -> None:
  out = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                  "device": device.device_kind, "backend": device.platform, "num_devices": settings.devices,
                  "load_avg_end": os.getloadavg()},
      "versions": versions(),
      "settings": {**dataclasses.asdict(settings), "surrogates": [x.spec for x in setup.surrogates],
                   "lr_inner_used": setup.lr_inner, "warmup": args.warmup, "steps": args.steps,
                   "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "command": " ".join(sys.argv)},
      "peak_matmul": peak, **({"peak_matmul_bf16": peak_bf16} if peak_bf16 else {}),
      "rows": rows, "ratios": ratios, "torch": torch_results,
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--image-size", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4, help="global batch")
  ap.add_argument("--width", type=int, default=16, help="enc_dim = dec_dim = dis_dim (AttGAN's full width: 64)")
  ap.add_argument("--layers", type=int, default=5)
  ap.add_argument("--max-dim", type=int, default=1024)
  ap.add_argument("--fc-dim", type=int, default=256, help="D's FC width (AttGAN: 1024)")
  ap.add_argument("--fr", default="bundled:mobilefacenet,bundled:mobilefacenet@flip",
                  help="surrogates: bundled:NAME or random:ARCH, optionally @flip")
  ap.add_argument("--k", type=int, default=0, help="number of surrogates (0: as many as --fr lists)")
  ap.add_argument("--lr-inner", type=float, default=None, help="inner step (default: the optimiser's learning rate)")
  ap.add_argument("--primaries", default="unrolled")
  ap.add_argument("--noise", action="store_true", help="the default training noise pool on x_adv (JAX rows only)")
  ap.add_argument("--devices", type=int, default=1,
                  help="data-parallel devices; on CPU this many host devices are simulated")
  ap.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--interleave-rounds", type=int, default=3,
                  help="alternating rounds of the stage-2 kinds for their time ratios (0: use the sequential rows)")
  ap.add_argument("--matmul", type=int, default=0, help="matmul side for the peak (0: 2048 on CPU, 8192 else)")
  ap.add_argument("--compare-torch", action="store_true")
  ap.add_argument("--torch-kinds", default="meta_auxiliary", help="stage-2 kinds to compare with torch")
  ap.add_argument("--torch-rounds", type=int, default=3)
  ap.add_argument("--torch-steps", type=int, default=2, help="steps per framework per round")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
  ap.add_argument("--torch-formulations", default="naive,best",
                  help="torch formulations to time: naive (create_graph=True) and/or best (torch.func HVP, "
                       "channels_last, fused Adam)")
  ap.add_argument("--torch-device", default="cpu", help="torch device of the comparison (cpu, cuda): use the device "
                  "JAX runs on")
  ap.add_argument("--bf16", action="store_true",
                  help="FR nets, D and R compute in bfloat16 (E_adv, G and the inner step float32), JAX and torch best")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cold-compile", action="store_true",
                  help="also compile each step with the persistent compilation cache off (compile_cold_s)")
  ap.add_argument("--isolate", action="store_true",
                  help="measure each row in its own subprocess, so its peak RSS is that row's alone")
  ap.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)  # an --isolate child: rows, nothing else
  ap.add_argument("--profile", default="", metavar="DIR",
                  help="profile the stage-2 step of the first --torch-kinds kind (JAX trace, and torch profiler tables "
                       "for --torch-formulations when torch is installed) into DIR; summarise with "
                       "`python -m benchmarks.profile_summary DIR`")
  ap.add_argument("--profile-steps", type=int, default=3)
  ap.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                  help="fold the frozen FR nets' BatchNorms into their convs, as the trainer does by default "
                       "(config.fr.fold_batchnorm; the torch 'best' formulation then folds them too); --no-fold-bn "
                       "keeps them")
  ap.add_argument("--compare-variants", default="",
                  help=f"comma-separated variants of the stage-2 meta-auxiliary step timed against this setting in "
                       f"alternating rounds (--interleave-rounds x --steps): {', '.join(VARIANTS)}")
  ap.add_argument("--xla-cpu-flags", default="", help="appended to XLA_FLAGS before the backend starts (e.g. "
                  "--xla_cpu_use_onednn=true); see --list-xla-cpu-flags and benchmarks/xla_cpu_flags.py")
  ap.add_argument("--list-xla-cpu-flags", action="store_true",
                  help="print the XLA:CPU flags this jaxlib knows (oneDNN, XNNPACK, ...) and exit")
  ap.add_argument("--out", default="benchmarks/step_throughput.json")
  args = ap.parse_args(argv)
  for stage in args.stages.split(","):
    if stage not in STAGES:
      ap.error(f"--stages: unknown {stage!r}; choose from {STAGES}")
  for kind in args.torch_kinds.split(","):
    if kind not in KINDS:
      ap.error(f"--torch-kinds: unknown {kind!r}; choose from {KINDS}")
  for name in filter(None, args.compare_variants.split(",")):
    if name not in VARIANTS:
      ap.error(f"--compare-variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
  for name in args.torch_formulations.split(","):
    if name not in ("naive", "best"):
      ap.error(f"--torch-formulations: unknown {name!r}; choose from naive, best")
  if args.torch_device not in ("cpu", "cuda") and not args.torch_device.startswith("cuda:"):
    ap.error(f"--torch-device: {args.torch_device!r} is neither cpu nor cuda[:N]")
  return args


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.list_xla_cpu_flags:
    from benchmarks import xla_cpu_flags  # pylint: disable=g-import-not-at-top
    xla_cpu_flags.print_discovered()
    return 0
  if args.xla_cpu_flags:  # read when the backend starts, which is below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_cpu_flags}".strip()
  if args.devices > 1 and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu") and jax.config.jax_platforms in (
      None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts; ignored by GPU/TPU
  settings = Settings(image_size=args.image_size, batch=args.batch, width=args.width, layers=args.layers,
                      max_dim=args.max_dim, fc_dim=args.fc_dim, fr=tuple(args.fr.split(",")), k=args.k,
                      lr_inner=args.lr_inner, primaries=args.primaries, noise=args.noise, devices=args.devices,
                      seed=args.seed, bf16=args.bf16, fold_bn=args.fold_bn)
  device = jax.devices()[0]
  setup = Setup(settings)
  n = args.matmul or (2048 if device.platform == "cpu" else 8192)
  peak = measure_matmul_peak(n)
  peak_bf16 = measure_matmul_peak(n, jnp.bfloat16) if device.platform != "cpu" else None
  print(f"{device.device_kind} x{settings.devices} ({device.platform}); peak {n}x{n} f32 matmul "
        f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s; load avg {os.getloadavg()[0]:.1f}")
  print(f"{settings.batch}x{settings.image_size}x{settings.image_size}, width {settings.width}, K="
        f"{len(setup.surrogates)} ({', '.join(x.spec for x in setup.surrogates)})")

  rows: dict[str, dict] = {}
  path = pathlib.Path(args.out)
  header = (f"{'step':<22}{'compile s':>10}{'median s':>10}{'img/s':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'of peak':>8}"
            f"{'mem MiB':>9}{'temp MiB':>9}")
  print(header)
  for entry in args.stages.split(","):
    stage, _, kind = entry.partition(":")
    if args.isolate and not args.row_only:
      r = _isolated_row(argv, entry, path)
    else:
      r = measure_step(setup, int(stage), kind or None, args.warmup, args.steps, args.cold_compile)
    r["fraction_of_peak"] = r["flops_per_s"] / (peak["flops_per_s"] * settings.devices)
    name = _row_name(int(stage), kind or None)
    rows[name] = r
    mem = r.get("rss_peak_mib", r.get("device_peak_mib"))
    print(f"{name:<22}{r['compile_s']:>10.1f}{r['median_s']:>10.3f}{r['images_per_s']:>8.2f}{r['flops'] / 1e9:>9.1f}"
          f"{r['flops_per_s'] / 1e9:>9.1f}{r['fraction_of_peak']:>8.1%}{mem:>9.0f}{r['xla_temp_mib']:>9.0f}"
          + (f"   cold compile {r['compile_cold_s']:.1f} s" if "compile_cold_s" in r else ""))
  if args.row_only:
    _write(path, args, settings, setup, device, peak, peak_bf16, rows, {}, [])
    return 0

  kinds = [name.partition(":")[2] for name in rows if name.startswith("stage2:")]
  interleaved = None
  if len(kinds) > 1 and args.interleave_rounds > 0:
    interleaved = measure_interleaved(setup, kinds, args.interleave_rounds, args.steps)
    print(f"interleaved ({args.interleave_rounds} rounds x {args.steps} steps): " +
          ", ".join(f"{kind} {t:.3f} s" for kind, t in interleaved["median_s"].items()))
  ratios = {"second_over_first_order": _ratio(rows, "stage2:meta_auxiliary", "stage2:first_order", interleaved),
            "second_order_over_ensemble": _ratio(rows, "stage2:meta_auxiliary", "stage2:ensemble", interleaved),
            "first_order_over_ensemble": _ratio(rows, "stage2:first_order", "stage2:ensemble", interleaved),
            "interleaved": interleaved}
  for name, r in ratios.items():
    if r and name != "interleaved":
      print(f"{name:<28} measured {r['time_ratio']:.2f}x ({r['timing']})   FLOP-predicted {r['flop_ratio']:.2f}x   "
            f"measured/predicted {r['time_over_flop_prediction']:.2f}")

  variants = args.compare_variants.split(",") if args.compare_variants else []
  if variants:
    ratios["variants"] = v = compare_variants(setup, variants, max(args.interleave_rounds, 1), args.steps)
    print("variants of stage2:meta_auxiliary (alternating rounds): base " + f"{v['median_s']['base']:.3f} s; " +
          ", ".join(f"{n} {v['median_s'][n]:.3f} s ({v['over_base'][n]:.2f}x)" for n in variants))

  torch_results = []
  _write(path, args, settings, setup, device, peak, peak_bf16, rows, ratios,
         torch_results)  # the JAX rows are kept even if the torch comparison is interrupted
  if args.compare_torch:
    for kind in args.torch_kinds.split(","):
      c = compare_torch(setup, kind, args.torch_rounds, args.torch_steps, args.warmup, args.torch_threads,
                        tuple(args.torch_formulations.split(",")), args.torch_device)
      torch_results.append(c)
      _write(path, args, settings, setup, device, peak, peak_bf16, rows,
             ratios, torch_results)
      for key, label in (("torch", "PyTorch eager (naive)"), ("torch_best", "PyTorch best")):
        if f"{key}_median_s" in c:
          print(f"stage2:{kind} JAX {c[f'{key}_jax_median_s']:.3f} s  {label} {c[f'{key}_median_s']:.3f} s  "
                f"torch/JAX {c[f'{key}_over_jax']:.2f}x (per round: "
                f"{', '.join(f'{x:.2f}' for x in c[f'{key}_over_jax_per_round'])}; torch {c['torch_device']}, "
                f"threads {c['torch_threads']})")

  if args.profile:
    meta = profile_stage2(setup, args.torch_kinds.split(",")[0], pathlib.Path(args.profile), args.profile_steps,
                          tuple(args.torch_formulations.split(",")) if _have_torch() else (), args.torch_device,
                          args.torch_threads)
    print(f"profiles in {args.profile} (wall s: {meta['wall_s']}); summary: python -m benchmarks.profile_summary "
          f"{args.profile}")

  _write(path, args, settings, setup, device, peak, peak_bf16, rows, ratios,
         torch_results)
  print(f"wrote {path}")
  return 0


def _have_torch() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _isolated_row(argv: list[str], entry: str, path: pathlib.Path) -> dict[str, Any]:
  """Runs this script on the one stage `entry` in a subprocess (same arguments) and returns its row, whose peak RSS
  is then that step's alone."""
  out = path.resolve().with_name(f"{path.stem}.isolated-{entry.replace(':', '-')}.json")
  cmd = [sys.executable, "-m", "benchmarks.step_throughput", *argv, "--stages", entry, "--out", str(out),
         "--row-only", "--interleave-rounds", "0"]
  proc = subprocess.run(cmd, cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"isolated row {entry} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  (row,) = json.loads(out.read_text())["rows"].values()
  out.unlink()
  row["isolated"] = True
  return row


if __name__ == "__main__":
  sys.exit(main())
