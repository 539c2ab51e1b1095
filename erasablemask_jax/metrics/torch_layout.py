"""Rename tables between PyTorch state_dicts and Flax variable trees for the metric networks (LPIPS, InceptionV3).

A table is a tuple of `Rule`s. Each rule pairs a PyTorch key template with a Flax path template; `{name}` placeholders
match one key segment (no `.` or `/`) and carry over. Conversion is pure numpy dict -> dict:

  conv weight  [O, I, kh, kw] (OIHW)  <->  Flax kernel [kh, kw, I, O] (HWIO)
  linear weight [O, I]                <->  Flax kernel [I, O]
  anything else                       <->  copied

Loading raises on any PyTorch key that no rule and no ignore pattern claims, and the result is merged strictly against
the abstract variables of the Flax module (`jax.eval_shape(init)`): every missing or unexpected path and every shape
mismatch is named in one error.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Iterable, Mapping

import numpy as np

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of a rename table.

  Attributes:
    torch: PyTorch key template, e.g. "features.{i}.weight".
    flax: Flax path template with "/" separators, starting with the collection, e.g. "params/net/features_{i}/kernel".
    kind: "conv" (OIHW <-> HWIO), "linear" ([O, I] <-> [I, O]) or "copy".
    reverse: whether Flax -> PyTorch export uses this rule (False for alternative PyTorch spellings).
  """
  torch: str
  flax: str
  kind: str = "copy"
  reverse: bool = True


def _template_regex(template: str) -> re.Pattern[str]:
  parts = _PLACEHOLDER.split(template)
  out = []
  for k, part in enumerate(parts):
    out.append(f"(?P<{part}>[^./]+)" if k % 2 else re.escape(part))
  return re.compile("".join(out))


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if kind == "linear":
    return np.transpose(value, (1, 0))
  return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  if kind == "linear":
    return np.transpose(value, (1, 0))
  return value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def torch_to_flax(state_dict: Mapping[str, Any], rules: Iterable[Rule], ignore: Iterable[str],
                  abstract_variables: Mapping[str, Any], what: str) -> dict[str, Any]:
  """Converts a PyTorch state_dict (numpy or torch tensors) into a Flax variable tree, strictly.

  Args:
    state_dict: PyTorch key -> array-like (anything `np.asarray` accepts, torch CPU tensors included).
    rules: the rename table.
    ignore: regular expressions (full match) for PyTorch keys deliberately dropped (classifier heads, counters).
    abstract_variables: `jax.eval_shape(module.init, ...)` of the target module; fixes the expected paths and shapes.
    what: a name for error messages, e.g. "LPIPS(alex)".

  Returns:
    A nested dict of float32 numpy arrays with exactly the paths and shapes of `abstract_variables`.

  Raises:
    ValueError: naming every PyTorch key no rule claims, every missing / unexpected Flax path, every shape mismatch.
  """
  rules = tuple(rules)
  compiled = [(_template_regex(r.torch), r) for r in rules]
  ignore_re = [re.compile(p) for p in ignore]
  flat: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}
  unknown, duplicated = [], []
  for key, value in state_dict.items():
    if any(p.fullmatch(key) for p in ignore_re):
      continue
    for regex, rule in compiled:
      m = regex.fullmatch(key)
      if m:
        path = rule.flax.format(**m.groupdict())
        if path in flat:
          duplicated.append(f"{key} and {sources[path]} -> {path}")
        flat[path] = _to_flax(np.asarray(_numpy(value), np.float32), rule.kind)
        sources[path] = key
        break
    else:
      unknown.append(key)
  expected = {p: tuple(v.shape) for p, v in _flatten(abstract_variables).items()}
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  mismatched = [f"{p}: checkpoint {flat[p].shape} (from {sources[p]}) vs model {expected[p]}"
                for p in sorted(set(flat) & set(expected)) if tuple(flat[p].shape) != expected[p]]
  problems = []
  if unknown:
    problems.append(f"{len(unknown)} checkpoint keys no rename rule knows: {unknown[:20]}")
  if duplicated:
    problems.append(f"keys mapped twice: {duplicated[:20]}")
  if missing:
    problems.append(f"{len(missing)} model variables the checkpoint lacks: {missing[:20]}")
  if unexpected:
    problems.append(f"{len(unexpected)} converted variables the model does not have: {unexpected[:20]}")
  if mismatched:
    problems.append(f"shape mismatches: {mismatched[:20]}")
  if problems:
    raise ValueError(f"cannot load {what} weights: " + "; ".join(problems)
                     + ". Check that the checkpoint is the one documented for this network.")
  return _unflatten(flat)


def flax_to_torch(variables: Mapping[str, Any], rules: Iterable[Rule], what: str) -> dict[str, np.ndarray]:
  """The reverse of `torch_to_flax`: a Flax variable tree -> a PyTorch-layout state_dict of numpy arrays.

  Raises:
    ValueError: naming every Flax path that no reversible rule produces.
  """
  compiled = [(_template_regex(r.flax), r) for r in rules if r.reverse]
  out, unknown = {}, []
  for path, value in _flatten(variables).items():
    for regex, rule in compiled:
      m = regex.fullmatch(path)
      if m:
        out[rule.torch.format(**m.groupdict())] = _to_torch(np.asarray(value), rule.kind)
        break
    else:
      unknown.append(path)
  if unknown:
    raise ValueError(f"cannot export {what}: no rename rule for {unknown[:20]}")
  return out


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    return value.detach().cpu().numpy()
  return np.asarray(value)


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into a flat key -> numpy dict.

  Args:
    path: `.pth`/`.pt`/`.ckpt` (PyTorch, needs torch: the `convert` extra; loaded with `weights_only=True`; a top-level
      `state_dict`/`net_state_dict` entry is unwrapped), `.safetensors`, or `.npz`.

  Returns:
    PyTorch key -> numpy array.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file {path} does not exist; pass the path of the downloaded checkpoint")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(str(path)))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install 'erasablemask-jax[convert]'), or convert it to "
                      ".safetensors / .npz first") from e
  obj = torch.load(str(path), map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "net_state_dict", "model"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
  return {k: _numpy(v) for k, v in obj.items() if hasattr(v, "shape")}

