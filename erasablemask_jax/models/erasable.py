"""ErasableMask's networks composed: G = (G_enc, G_dec), the perturbation encoder E_adv, the restorer R and D.

Every network's variables are a separate `{'params', 'batch_stats'}` pytree, so the trainer can freeze, copy and
differentiate them independently; the functions here are pure in those pytrees.

Eq. 6-7 of the paper: `perb_i = E_adv^i(perb_{i-1})` with `perb_0 = x_cov`, `fs_i = beta * ft_i + (1 - beta) * perb_i`,
`x_adv = G_dec([fs_1..fs_n], att_b)`, with the clean branch `G_dec(G_enc(x_cov), att_b)` fused into every decoder layer
by `gamma`. The restorer decodes with the *source* attributes: `x_rec = R(x_adv, att_a)`. R is G's encoder-decoder,
optionally with its own shortcut / injection layer counts (`model.r_shortcut_layers`, `model.r_inject_layers`); it is
initialised from G wherever the shapes agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp

from erasablemask_jax.models.attgan import AttGAN, Discriminator, Encoder, lerp

Array = jax.Array
Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ErasableMask:
  """The module definitions and the fusion constants; holds no parameters.

  `restorer` is R's module; None (or `generator` itself) means R has exactly G's structure.
  """

  generator: AttGAN
  perturbation_encoder: Encoder
  discriminator: Discriminator
  beta: float = 0.5
  gamma: float = 0.05
  thres_int: float = 0.5
  restorer: AttGAN | None = None

  def __post_init__(self):
    if self.restorer is None:
      object.__setattr__(self, "restorer", self.generator)

  @classmethod
  def from_config(cls, model_config, num_attributes: int) -> "ErasableMask":
    """Builds the networks from a `config.model` ConfigDict (see `configs/default.py`)."""
    m = model_config
    dtype = jnp.dtype(m.dtype)

    def attgan(shortcut_layers, inject_layers):
      return AttGAN(enc_dim=m.enc_dim, enc_layers=m.enc_layers, dec_dim=m.dec_dim, dec_layers=m.dec_layers,
                    max_dim=m.max_dim, shortcut_layers=shortcut_layers, inject_layers=inject_layers, dtype=dtype)

    generator = attgan(m.shortcut_layers, m.inject_layers)
    # Runs saved before these fields existed have no such keys: R is then G's structure, as it was.
    r_counts = (_or_default(m.get("r_shortcut_layers", -1), m.shortcut_layers),
                _or_default(m.get("r_inject_layers", -1), m.inject_layers))
    restorer = generator if r_counts == (m.shortcut_layers, m.inject_layers) else attgan(*r_counts)
    return cls(
        generator=generator,
        perturbation_encoder=Encoder(dim=m.enc_dim, num_layers=m.enc_layers, max_dim=m.max_dim, dtype=dtype),
        discriminator=Discriminator(dim=m.dis_dim, num_layers=m.dis_layers, fc_dim=m.dis_fc_dim, max_dim=m.max_dim,
                                    num_attributes=num_attributes, dtype=dtype),
        beta=m.beta, gamma=m.gamma, thres_int=m.thres_int, restorer=restorer)

  # ---------------------------------------------------------------------------------------------------------------
  # Initialisation and the curriculum's copies.

  def init(self, rng: Array, image_size: int, num_attributes: int) -> dict[str, Variables]:
    """Fresh variables for G and D, and E_adv / R initialised from G as the curriculum prescribes.

    An R whose structure differs from G's gets its own fresh variables, overwritten by G's wherever the shapes agree.
    """
    g_rng, d_rng = jax.random.split(rng)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    att = jnp.zeros((1, num_attributes), jnp.float32)
    g = dict(self.generator.init(g_rng, x, att, train=False))
    d = dict(self.discriminator.init(d_rng, x))
    r_fresh = None
    if self.restorer is not self.generator:  # its own key, so G's and D's initial values do not depend on R
      r_fresh = dict(self.restorer.init(jax.random.fold_in(rng, 2), x, att, train=False))
    return {"g": g, "e_adv": perturbation_encoder_from_generator(g), "r": restorer_from_generator(g, r_fresh), "d": d}

  def abstract_variables(self, image_size: int, num_attributes: int) -> dict[str, Variables]:
    """Shapes and dtypes of `init`'s output without allocating (for checkpoint restore and sharding)."""
    return jax.eval_shape(lambda r: self.init(r, image_size, num_attributes), jax.random.key(0))

  # ---------------------------------------------------------------------------------------------------------------
  # Forward passes. Each returns its outputs and the networks' updated `batch_stats` (unchanged when not training).

  def encode_attributes(self, att: Array) -> Array:
    """0/1 labels -> the decoder's attribute code `(2a - 1) * thres_int` (AttGAN's convention)."""
    return (2.0 * att - 1.0) * self.thres_int

  def edit(self, g_vars: Variables, x: Array, att: Array, *, train: bool = False) -> tuple[Array, Variables]:
    """The clean attribute edit `G_dec(G_enc(x), att)`; with `att = att_a` it is the reconstruction of Eq. 5."""
    out, state = _apply(self.generator, g_vars, x, self.encode_attributes(att), train=train)
    return out, state

  def edit_and_reconstruct(self, g_vars: Variables, x: Array, att_a: Array, att_b: Array, *,
                           train: bool = False) -> tuple[tuple[Array, Array], Variables]:
    """Stage 1's two decodes of one encoding: `(G_dec(z, att_b), G_dec(z, att_a))` with `z = G_enc(x)`."""
    zs, state = _apply(self.generator, g_vars, x, train=train, method="encode")
    g_vars = _with_state(g_vars, state)
    x_edit, state = _apply(self.generator, g_vars, zs, self.encode_attributes(att_b), train=train, method="decode")
    g_vars = _with_state(g_vars, state)
    x_recon, state = _apply(self.generator, g_vars, zs, self.encode_attributes(att_a), train=train, method="decode")
    return (x_edit, x_recon), state

  def protect(self, g_vars: Variables, e_vars: Variables, x: Array, att_b: Array, *, train_g: bool = False,
              train_e: bool = False) -> tuple[tuple[Array, Array], tuple[Variables, Variables]]:
    """Eq. 6-7 with clean-domain injection.

    Returns:
      `((x_adv, x_edit), (g_batch_stats, e_batch_stats))` where `x_edit = x_cov^{att_b} = G_dec(G_enc(x), att_b)`
      is the clean branch computed in the same pass.
    """
    code = self.encode_attributes(att_b)
    ft, g_state = _apply(self.generator, g_vars, x, train=train_g, method="encode")
    perb, e_state = _apply(self.perturbation_encoder, e_vars, x, train=train_e)
    fs = [lerp(p, f, self.beta) for f, p in zip(ft, perb)]
    g_vars = _with_state(g_vars, g_state)
    (x_adv, x_edit), g_state = _apply(self.generator, g_vars, fs, code, train=train_g, clean_zs=ft, gamma=self.gamma,
                                      method="decode")
    return (x_adv, x_edit), (g_state, e_state)

  def restore(self, r_vars: Variables, x_adv: Array, att_a: Array, *, train: bool = False) -> tuple[Array, Variables]:
    """Eq. 13's restorer: `x_rec = R(x_adv, att_a)`, decoding with the source attributes."""
    return _apply(self.restorer, r_vars, x_adv, self.encode_attributes(att_a), train=train)

  def discriminate(self, d_vars: Variables, x: Array) -> tuple[Array, Array]:
    """`(D_G logits (B,), D_att logits (B, A))`."""
    return self.discriminator.apply(d_vars, x)


def _apply(module, variables: Variables, *args, train: bool, method: str | None = None, **kwargs):
  """Applies `module` and returns `(output, batch_stats)`, mutating running statistics only when training."""
  fn = getattr(module, method) if method else module.__call__
  if train:
    out, updates = module.apply(variables, *args, train=True, method=fn, mutable=["batch_stats"], **kwargs)
    return out, updates["batch_stats"]
  return module.apply(variables, *args, train=False, method=fn, **kwargs), variables.get("batch_stats", {})


def _with_state(variables: Variables, batch_stats: Variables) -> Variables:
  return {**variables, "batch_stats": batch_stats}


def _copy(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def perturbation_encoder_from_generator(g_vars: Variables) -> Variables:
  """E_adv's initial variables: a copy of G_enc's (the paper initialises E_adv as G_enc)."""
  return {"params": _copy(g_vars["params"]["enc"]), "batch_stats": _copy(g_vars["batch_stats"]["enc"])}


def restorer_from_generator(g_vars: Variables, r_vars: Variables | None = None) -> Variables:
  """R's initial variables at the start of stage 2: a copy of G_enc and G_dec.

  Args:
    g_vars: G's variables.
    r_vars: R's current variables, when R's structure may differ from G's (its own shortcut / injection counts).
      Every leaf whose path exists in G with the same shape and dtype becomes a copy of G's; the others keep their
      value from `r_vars` (R's fresh initialisation), to be trained from scratch. None: R is exactly G's structure.

  Returns:
    New buffers (never aliases of G's), so donating or updating R leaves G intact.
  """
  if r_vars is None:
    return _copy(g_vars)
  g_flat = flax.traverse_util.flatten_dict(g_vars)

  def from_g(path, leaf):
    source = g_flat.get(tuple(k.key for k in path))
    same = source is not None and source.shape == leaf.shape and source.dtype == leaf.dtype
    return jnp.array(source if same else leaf, copy=True)

  return jax.tree_util.tree_map_with_path(from_g, r_vars)


def _or_default(value: int, default: int) -> int:
  return default if value < 0 else value
