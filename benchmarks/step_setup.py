"""What the step benchmarks share: their settings, the surrogates they name, and `Setup`, which builds the jitted
steps through the trainer's own `erasablemask_jax.train.build` (same shardings, donation and uint8 batch as training).

`step_throughput` (timings), `torch_reference` (the PyTorch twin and its equality check), `meta_grad_precision` and
`bf16_meta_grad` (numerics) all start from a `Setup(Settings(...))`.

Surrogates (`Settings.fr`, K = their number or `Settings.k`): `bundled:mobilefacenet` (the bundled weights),
`random:ARCH` (random weights of any zoo architecture, e.g. `random:iresnet50`), `tiny` (the 16x16 two-conv net of
`benchmarks/tiny_fr.py`, for tests), each optionally `@flip` (the mirrored view, a different function of the image).
With `k` larger than the list, the list is cycled, alternating the view.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import tiny_fr
from configs import default as default_config
from erasablemask_jax import fr
from erasablemask_jax.fr.surrogates import Surrogate, load_surrogate, target_embeddings
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train import build as build_lib
from erasablemask_jax.train import mesh as mesh_lib

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
  config.seed = s.seed
  config.attack.primaries = s.primaries
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
  """`bundled:NAME[@flip]`, `random:ARCH[@flip]` or `tiny[@flip]` (module docstring)."""
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


def capture_grads() -> optax.GradientTransformation:
  """An identity transformation whose state is the last gradient (to read a step's raw gradients)."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def _perturbed_e_adv(seed: int, state):
  """As after some stage-2 training: E_adv no longer equals G_enc (else x_adv == x_edit exactly)."""
  leaves, tree = jax.tree.flatten(state.e_adv.params)
  keys = jax.random.split(jax.random.key(seed + 3), len(leaves))
  leaves = [a * (1.0 + 0.1 * jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys)]
  return state.replace(e_adv=state.e_adv.replace(params=jax.tree.unflatten(tree, leaves)))


class Setup:
  """Surrogates, targets, the mesh and the trainer's jitted steps (`train.build`) of one benchmark configuration."""

  def __init__(self, settings: Settings, surrogates: list[Surrogate] | None = None):
    """Builds everything for `settings`; `surrogates` replaces the ones `settings.fr` names (e.g. tiny test nets)."""
    self.settings = s = settings
    self.config = make_config(s)
    self.lr_inner = self.config.attack.lr_inner
    self.num_attributes = len(self.config.attributes)
    self.models = ErasableMask.from_config(self.config.model, self.num_attributes)
    if s.bf16:
      self.models = bf16_models(self.models)
    self.mesh = mesh_lib.make_mesh(self.config.mesh)
    self.surrogates = surrogates if surrogates is not None else [
        make_surrogate(spec, s.seed + i) for i, spec in enumerate(surrogate_specs(s))]
    rng = np.random.default_rng(s.seed + 1)
    target = jnp.asarray(rng.uniform(-1, 1, (1, s.image_size, s.image_size, 3)), jnp.float32)
    targets = target_embeddings(self.surrogates, target)
    fr_vars = [x.variables for x in self.surrogates]
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
    self._built, self._compiled = {}, {}
    default = self.built()
    self.tx, self.batch_sharding = default.tx, default.batch_sharding
    self.targets, self.fr_vars = default.place_replicated(targets), default.place_replicated(fr_vars)

  # -------------------------------------------------------------------------------------------------------------------
  def built(self, kind: str | None = None, tx=None) -> build_lib.Built:
    """The trainer's steps (`train.build`) for the attack `kind` (default: the config's) and optimiser `tx`."""
    kind = kind or self.config.attack.kind
    key = (kind, id(tx), id(self.models))
    if key not in self._built:
      config = self.config.copy_and_resolve_references()
      config.attack.kind = kind
      self._built[key] = build_lib.build(config, self.mesh, [x.apply for x in self.surrogates], models=self.models,
                                         tx=tx)
    return self._built[key]

  def step_config(self, kind: str | None = None, tx=None):
    return self.built(kind, tx).step_config

  def host_batch(self) -> dict[str, np.ndarray]:
    """A deterministic pipeline batch: smooth random uint8 images and random 0/1 attributes (att_b flips some)."""
    s = self.settings
    rng = np.random.default_rng(s.seed + 2)
    yy, xx = np.mgrid[:s.image_size, :s.image_size] / s.image_size
    base = np.stack([yy, xx, 1 - yy], -1)[None] * rng.uniform(0.3, 1.0, (s.batch, 1, 1, 3))
    image = np.clip(2 * base - 1 + rng.normal(0, 0.1, (s.batch, s.image_size, s.image_size, 3)), -1, 1)
    att_a = (rng.random((s.batch, self.num_attributes)) < 0.5).astype(np.float32)
    att_b = np.where(rng.random(att_a.shape) < 0.3, 1 - att_a, att_a).astype(np.float32)
    return {"image": np.round((image + 1) * 127.5).astype(np.uint8), "att_a": att_a, "att_b": att_b}

  def model_batch(self) -> dict[str, np.ndarray]:
    """`host_batch()` as the steps see it (images in [-1, 1], converted by XLA as inside the jitted step, to the last
    bit: numpy's `p / 127.5 - 1` differs in 1 ulp), for the torch twin and scripts that call a step function."""
    return jax.device_get(jax.jit(build_lib.prepare)(self.host_batch()))

  def device_batch(self) -> dict[str, jax.Array]:
    return jax.device_put(self.host_batch(), self.batch_sharding)

  def state(self, stage: int, tx=None):
    """A fresh train state for `stage` (stage >= 2: after `begin_stage2`, E_adv perturbed), placed as training
    places it."""
    built = self.built(None, tx)
    state = built.init_state()
    if stage >= 2:
      state = built.begin_stage2()(state)
      state = jax.jit(functools.partial(_perturbed_e_adv, self.settings.seed), out_shardings=built.state_sharding,
                      donate_argnums=(0,))(state)
    return state

  def stage2_state(self):
    return self.state(2)

  def jitted(self, stage: int, kind: str | None = None, tx=None):
    """`(jitted_step, extra_args)`: the trainer's step of `stage` (`Built.step`)."""
    extra = build_lib.extra_args(stage, self.fr_vars, self.targets)
    return self.built(kind if stage == 2 else None, tx).step(stage), extra

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
    """One stage-2 step from `stage2_state()` on the pipeline `batch`; returns `(metrics, {net: raw grads},
    new_state)`."""
    tx = optax.chain(capture_grads(), self.tx)
    step, extra = self.jitted(2, kind, tx)
    state, metrics = step(self.state(2, tx), jax.device_put(batch, self.batch_sharding), *extra)
    grads = {net: jax.device_get(getattr(state, net).opt_state[0]) for net in ("d", "e_adv", "r")}
    return jax.device_get(metrics), grads, state


def timed_step(compiled, state, batch, extra) -> tuple[Any, float]:
  """One step, blocked until its state and metrics are ready; `(new_state, seconds)`."""
  start = time.perf_counter()
  state, metrics = compiled(state, batch, *extra)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


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
