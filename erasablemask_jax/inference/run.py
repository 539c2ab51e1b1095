"""A trained run for inference: its jitted protect / restore / attribute-prediction functions and its fingerprint.

    run = load_run(workdir)
    x_adv, x_edit = run.protect(x, att_b)     # float NHWC [-1, 1], att 0/1 (N, 13)
    x_rec = run.restore(x_adv, att_a)
    logits = run.attribute_logits(x)

All three take fixed-size chunks (`batch_size`, the last one zero-padded), so each compiles once per run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from erasablemask_jax import image_io
from erasablemask_jax.models import ErasableMask
from erasablemask_jax.train.checkpoint import restore_run


def params_fingerprint(state) -> str:
  """sha256 over the inference networks' variables (G, E_adv, R, D): every leaf's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  tree = {name: getattr(state, name).variables for name in ("g", "e_adv", "r", "d")}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def protect_images(models: ErasableMask, g_vars, e_vars, x, att_b):
  """`(x_adv, x_edit)` of images in [-1, 1] (inference mode); pure, jitted by `Run` and compiled by `aot`."""
  (x_adv, x_edit), _ = models.protect(g_vars, e_vars, x, att_b)
  return x_adv, x_edit


def restore_images(models: ErasableMask, r_vars, x_adv, att_a):
  """R's restoration of protected images with the source attributes (inference mode)."""
  return models.restore(r_vars, x_adv, att_a)[0]


def _attribute_logits(models: ErasableMask, d_vars, x):
  return models.discriminate(d_vars, x)[1]


@dataclasses.dataclass
class Run:
  """A restored training run.

  Attributes:
    workdir: the run directory.
    config: its saved config.
    models: the network definitions.
    state: the restored train state.
    step: the checkpoint step.
    fingerprint: `params_fingerprint(state)`.
    batch_size: images per jitted call.
  """

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  models: ErasableMask
  state: Any
  step: int
  fingerprint: str
  batch_size: int = 16

  def __post_init__(self):
    self._protect = jax.jit(functools.partial(protect_images, self.models))
    self._restore = jax.jit(functools.partial(restore_images, self.models))
    self._logits = jax.jit(functools.partial(_attribute_logits, self.models))

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  def checkpoint_info(self) -> dict[str, Any]:
    """What a sidecar records about the checkpoint."""
    return {"workdir": str(self.workdir.resolve()), "step": int(self.step), "params_sha256": self.fingerprint}

  def protect(self, x: np.ndarray, att_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(x_adv, x_edit)` for float [-1, 1] faces (N, S, S, 3) and target attributes (N, 13)."""
    adv, edit = [], []
    for start in range(0, len(x), self.batch_size):
      a, e = self._call(self._protect, (self.state.g.variables, self.state.e_adv.variables),
                        x[start:start + self.batch_size], att_b[start:start + self.batch_size])
      adv.append(a)
      edit.append(e)
    return np.concatenate(adv), np.concatenate(edit)

  def restore(self, x_adv: np.ndarray, att_a: np.ndarray) -> np.ndarray:
    """`R(x_adv, att_a)` for float [-1, 1] faces (N, S, S, 3)."""
    return np.concatenate([self._call(self._restore, (self.state.r.variables,), x_adv[s:s + self.batch_size],
                                      att_a[s:s + self.batch_size]) for s in range(0, len(x_adv), self.batch_size)])

  def attribute_logits(self, x: np.ndarray) -> np.ndarray:
    """D_att's logits (N, 13) for float [-1, 1] faces."""
    return np.concatenate([self._call(self._logits, (self.state.d.variables,), x[s:s + self.batch_size])
                           for s in range(0, len(x), self.batch_size)])

  def _call(self, fn, variables, *arrays):
    """`fn(*variables, *chunk)` on one chunk zero-padded to `batch_size` rows (one compiled shape)."""
    n = len(arrays[0])
    pad = self.batch_size - n
    padded = [np.concatenate([np.asarray(a, np.float32), np.zeros((pad,) + a.shape[1:], np.float32)]) if pad
              else np.asarray(a, np.float32) for a in arrays]
    out = fn(*variables, *padded)
    if isinstance(out, tuple):
      return tuple(np.asarray(o)[:n] for o in out)
    return np.asarray(out)[:n]


def load_run(workdir: str | os.PathLike[str], step: int | None = None, batch_size: int = 16) -> Run:
  """Restores a run (`train.checkpoint.restore_run`) for inference.

  Raises:
    FileNotFoundError: `workdir` is not a trained run (no config.json or no checkpoint); the message says so.
  """
  config, models, state, step = restore_run(workdir, step)
  return Run(workdir=pathlib.Path(workdir), config=config, models=models, state=state, step=int(step),
             fingerprint=params_fingerprint(state), batch_size=batch_size)


to_model_input = image_io.uint8_to_minus1_1  # uint8 RGB -> float32 [-1, 1], the inverse of `image_io.to_uint8`


