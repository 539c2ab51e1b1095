"""Reading PyTorch checkpoints into plain numpy state dicts, without trusting pickled code.

`.pth` / `.pt` / `.ckpt` / `.bin` files are read with `torch.load(weights_only=True)` (torch is imported lazily, so the
rest of the package never needs it); `.safetensors` files with `safetensors.numpy`. Common wrappers are unwrapped:
a dict holding the real state dict under `state_dict`, `net_state_dict`, `model`, `model_state_dict` or `net`, and the
`module.` prefix that `nn.DataParallel` adds.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

WRAPPER_KEYS = ("state_dict", "net_state_dict", "model_state_dict", "model", "net", "backbone")
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")
WEIGHT_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".params")


class CheckpointError(ValueError):
  """A checkpoint file cannot be read, or is not a state dict of the expected architecture."""


def require_checkpoint_file(path: str | os.PathLike[str]) -> pathlib.Path:
  """`path` as a Path when it is a file; a folder or a missing path raises with what to pass instead.

  Raises:
    FileNotFoundError: nothing at `path`.
    CheckpointError: `path` is a folder (the message lists the weight files in it, or says it is a converted model).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    if (path / "card.json").is_file():
      raise CheckpointError(f"checkpoint {path} is a converted model directory (it has card.json), not a checkpoint "
                            "to convert; use it as it is (e.g. --fr or fr.surrogates)")
    found = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    inside = (f"pass one of the weight files in it: {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}"
              if found else f"it holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    raise CheckpointError(f"checkpoint {path} is a folder, not a weights file; {inside}")
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  return path


def check_finite(arrays: Mapping[str, np.ndarray], context: str, limit: int = 5) -> None:
  """Raises `CheckpointError` naming the floating-point arrays that hold NaN or Inf (the first `limit` of them).

  A checkpoint saved after training diverged converts without complaint, then embeds every face as NaN; refusing it
  here names the damage instead.
  """
  bad = [f"{k} ({int(np.size(v) - np.isfinite(v).sum())} of {np.size(v)})" for k, v in arrays.items()
         if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
  if bad:
    shown = ", ".join(bad[:limit]) + (", ..." if len(bad) > limit else "")
    raise CheckpointError(f"{context}: refused: {len(bad)} tensors hold NaN/Inf ({shown}); the checkpoint is damaged "
                          "or diverged: download it again or take an earlier one")


def _unwrap(obj: Any, path: pathlib.Path) -> Mapping[str, Any]:
  """Descends through known wrapper keys until a flat name -> tensor mapping is found."""
  for _ in range(4):
    if not isinstance(obj, Mapping):
      raise CheckpointError(
          f"{path}: expected a state dict (a mapping of parameter names to tensors), got {type(obj).__name__}; "
          "save the model with torch.save(model.state_dict(), FILE)")
    tensor_like = [k for k, v in obj.items() if hasattr(v, "shape")]
    if tensor_like and len(tensor_like) >= len(obj) // 2:
      return obj
    for key in WRAPPER_KEYS:
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
    else:
      raise CheckpointError(
          f"{path}: found a dict with keys {sorted(map(str, obj))[:10]} but no state dict under any of "
          f"{WRAPPER_KEYS}; extract the state dict and save it alone")
  raise CheckpointError(f"{path}: state dict nested too deeply under wrapper keys")


def _strip_prefix(state: Mapping[str, np.ndarray], prefix: str = "module.") -> dict[str, np.ndarray]:
  if state and all(k.startswith(prefix) for k in state):
    return {k[len(prefix):]: v for k, v in state.items()}
  return dict(state)


def _torch_load(path: pathlib.Path) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f"{path}: reading PyTorch checkpoints needs torch; install the `convert` extra "
        "(pip install 'erasablemask-jax[convert]' or pip install torch==2.13.0)") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage.
    text = str(e)
    if "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in type(e).__name__ and (
        "GLOBAL" in text or "global" in text):
      raise CheckpointError(
          f"{path}: refused to load: the pickle references code or objects that are not plain tensors "
          f"(torch.load(weights_only=True) said: {text.splitlines()[0] if text else type(e).__name__}). "
          "Loading it fully could execute arbitrary code. If you trust the file, re-save only the weights "
          "(torch.save(model.state_dict(), 'weights.pth')) or convert it to .safetensors, and convert that") from e
    raise CheckpointError(
        f"{path}: could not be read as a PyTorch checkpoint ({type(e).__name__}: {text.splitlines()[0] if text else ''}); "
        "the file may be truncated or not a checkpoint: download it again and check its sha256") from e


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a PyTorch or safetensors checkpoint into a flat `{name: np.ndarray}` state dict.

  Args:
    path: a `.pth`/`.pt`/`.ckpt`/`.bin`/`.tar` file written by `torch.save`, or a `.safetensors` file.

  Returns:
    The state dict with wrapper dicts and a common `module.` prefix removed; values are numpy arrays (float tensors
    keep their dtype; `num_batches_tracked` counters are kept here and dropped by the converters).

  Raises:
    FileNotFoundError: the file does not exist.
    CheckpointError: the path is a folder, or the file is truncated or corrupt, carries pickled code (refused), or
      holds no state dict.
  """
  path = require_checkpoint_file(path)
  if path.suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(str(path))
    except Exception as e:
      raise CheckpointError(
          f"{path}: could not be read as safetensors ({type(e).__name__}: {e}); the file may be truncated") from e
    return _strip_prefix(state)
  obj = _torch_load(path)
  state = _unwrap(obj, path)
  out = {}
  for key, value in state.items():
    if not hasattr(value, "shape"):
      continue
    if hasattr(value, "detach"):
      value = value.detach().cpu()
      if str(value.dtype) == "torch.bfloat16":
        value = value.float()
      value = value.numpy()
    out[str(key)] = np.asarray(value)
  if not out:
    raise CheckpointError(f"{path}: the state dict holds no tensors")
  return _strip_prefix(out)
