"""Rename tables between PyTorch state_dicts and Flax variable trees: the one rename style of every converter.

A table is a tuple of `Rule`s. Each rule pairs a PyTorch key template with a Flax path template; `{name}` placeholders
match one key segment (no `.` or `/`) and carry over. Conversion is pure numpy dict -> dict:

  conv weight  [O, I, kh, kw] (OIHW)  <->  Flax kernel [kh, kw, I, O] (HWIO)
  linear weight [O, I]                <->  Flax kernel [I, O]
  anything else                       <->  copied

A PyTorch key that no rule and no ignore pattern claims is kept as `unmapped/<key>`, and the result is merged with
`convert.strict_merge` against the abstract variables of the Flax module (`jax.eval_shape(init)`): every unknown key,
every missing path and every shape mismatch is named in one error. Tables are written out (LPIPS, FID InceptionV3,
MTCNN) or generated from a state dict's tensors (`layout.torch_to_flax_flat`, the FR zoo), and drive the converter
registry's `rename` functions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import numpy as np

from erasablemask_jax.convert.merge import strict_merge

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


def rename_flat(state_dict: Mapping[str, Any], rules: Iterable[Rule], ignore: Iterable[str]) -> dict[str, np.ndarray]:
  """Renames and re-lays a PyTorch state_dict into flat Flax paths (`collection/a/b/leaf`) by the table.

  Args:
    state_dict: PyTorch key -> array-like (numpy, or torch CPU tensors).
    rules: the rename table; the first rule whose template matches a key wins.
    ignore: regular expressions (full match) for PyTorch keys deliberately dropped (classifier heads, counters).

  Returns:
    `{"params/net/features_0/kernel": array, ...}`; a key that no rule claims is kept as `unmapped/<key>` so that
    `convert.strict_merge` names it as unexpected rather than it being dropped silently.
  """
  rules = list(rules)
  literal: dict[str, int] = {}  # a rule without placeholders matches one key: looked up, not scanned
  templates = []
  for index, rule in enumerate(rules):
    if _PLACEHOLDER.search(rule.torch):
      templates.append((index, _template_regex(rule.torch)))
    else:
      literal.setdefault(rule.torch, index)
  ignore_re = [re.compile(p) for p in ignore]
  flat: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    if any(p.fullmatch(key) for p in ignore_re):
      continue
    match = next(((i, m) for i, regex in templates if (m := regex.fullmatch(key))), None)
    index = literal.get(key)
    if index is not None and (match is None or index < match[0]):
      match = (index, None)
    if match is None:
      flat[f"unmapped/{key}"] = np.asarray(_numpy(value))
      continue
    rule = rules[match[0]]
    path = rule.flax.format(**match[1].groupdict()) if match[1] else rule.flax
    if path in flat:
      raise ValueError(f"two checkpoint keys map to {path} (the second is {key}); pass one spelling only")
    flat[path] = _to_flax(np.asarray(_numpy(value), np.float32), rule.kind)
  return flat


def torch_to_flax(state_dict: Mapping[str, Any], rules: Iterable[Rule], ignore: Iterable[str],
                  abstract_variables: Mapping[str, Any], what: str) -> dict[str, Any]:
  """`rename_flat`, then the converter's strict merge against `abstract_variables` (`jax.eval_shape(init)`).

  Returns:
    A nested dict of numpy arrays with exactly the paths, shapes and dtypes of `abstract_variables`.

  Raises:
    merge.StrictMergeError: naming every unknown checkpoint key (as `unmapped/...`), missing variable and shape
      mismatch in one message.
  """
  return strict_merge(rename_flat(state_dict, rules, ignore), abstract_variables, context=what)


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

