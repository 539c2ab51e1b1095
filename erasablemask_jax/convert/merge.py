"""Strict merge of converted flat tensors into a Flax variable tree.

Like big_vision's and Scenic's loaders: every key missing on either side and every shape mismatch is named, all in
one error, so a wrong architecture or a renamed layer is diagnosed in one run.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import numpy as np

from erasablemask_jax.convert.state_dict import CheckpointError


class StrictMergeError(CheckpointError):
  """Converted tensors do not match the model's variables: names every missing, unexpected and mis-shaped key."""

  def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], context: str = "",
               limit: int | None = None, hint: str | None = None):
    self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
    self.context = context
    lines = [f"checkpoint does not match the model{(' (' + context + ')') if context else ''}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped"]
    for title, keys in (("missing (in the model, not in the checkpoint)", missing),
                        ("unexpected (in the checkpoint, not in the model)", unexpected),
                        ("mis-shaped", mismatched)):
      if keys:
        lines.append(f"  {title}:")
        lines.extend(f"    {k}" for k in keys[:limit])
        if limit is not None and len(keys) > limit:
          lines.append(f"    ... and {len(keys) - limit} more")
    lines.append("  " + (hint or "Is the checkpoint for a different --arch (or depth)? Check the architecture the "
                                 "checkpoint was trained with."))
    super().__init__("\n".join(lines))


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """`{'params': {'a': {'kernel': x}}}` -> `{'params/a/kernel': x}`."""
  return {k: v for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables), sep="/").items()}


def strict_merge(flat: Mapping[str, np.ndarray], abstract_variables: Mapping[str, Any],
                 context: str = "", limit: int | None = None, hint: str | None = None) -> dict[str, Any]:
  """Builds the variable tree of `abstract_variables` from `flat`, requiring an exact one-to-one match.

  Args:
    flat: `{"params/layer1_0/conv1/kernel": array, ...}` as produced by an architecture's rename function.
    abstract_variables: `jax.eval_shape(module.init, ...)` (leaves with `.shape` and `.dtype`).
    context: words for the error message (e.g. the architecture and checkpoint names).
    limit: list at most this many keys of each kind in the error (the counts are always complete); None lists all.
    hint: the error's last line, what to do (default: a different --arch?).

  Returns:
    Nested `{'params': ..., 'batch_stats': ...}` of numpy arrays cast to the abstract dtypes.

  Raises:
    StrictMergeError: naming every missing, unexpected and mis-shaped key at once.
  """
  want = flatten_variables(abstract_variables)
  missing = sorted(k for k in want if k not in flat)
  unexpected = sorted(k for k in flat if k not in want)
  mismatched = sorted(
      f"{k}: checkpoint {tuple(np.shape(flat[k]))} vs model {tuple(want[k].shape)}"
      for k in want if k in flat and tuple(np.shape(flat[k])) != tuple(want[k].shape))
  if missing or unexpected or mismatched:
    raise StrictMergeError(missing, unexpected, mismatched, context, limit, hint)
  out = {k: np.asarray(flat[k], dtype=want[k].dtype) for k in want}
  return flax.traverse_util.unflatten_dict(out, sep="/")


def abstract_init(module: Any, input_shape: tuple[int, ...]) -> Any:
  """`jax.eval_shape` of `module.init` on a zero batch of `input_shape` (no arrays are allocated)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), np.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)
