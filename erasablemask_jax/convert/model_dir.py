"""A converted model on disk: `DIR/variables/` (an orbax PyTree checkpoint) and `DIR/card.json`.

Writing is atomic: everything goes to a hidden temporary directory beside DIR which is then renamed onto DIR, so a
crash never leaves a half-written model. An existing DIR is only replaced with `force=True`, and only when it is a model
directory (it holds `card.json`): `--force` never deletes a folder of other files, nor `.`. The directory gets the
usual permissions (0777 less the umask, so 0755 with the common umask 022), not a temporary directory's 0700.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

CARD_FILE = "card.json"
VARIABLES_DIR = "variables"


class ModelDirError(ValueError):
  """A model directory is missing, incomplete, or would be overwritten."""


def check_writable(out_dir: str | os.PathLike[str], force: bool = False) -> pathlib.Path:
  """Raises `ModelDirError` unless `out_dir` is free, or `force` is on and it is a model directory; returns it."""
  out_dir = pathlib.Path(out_dir)
  if not out_dir.exists():
    return out_dir
  if not force:
    raise ModelDirError(f"output {out_dir} already exists; choose another directory or pass --force to replace it")
  if not out_dir.is_dir():
    raise ModelDirError(f"output {out_dir} exists and is not a directory; remove it first")
  if not (out_dir / CARD_FILE).is_file():
    raise ModelDirError(f"--force replaces only a model directory, and {out_dir} has no {CARD_FILE}; it was left as "
                        "it is: choose another --out")
  return out_dir


def write_model_dir(out_dir: str | os.PathLike[str], variables: Mapping[str, Any], card: Mapping[str, Any],
                    force: bool = False) -> pathlib.Path:
  """Writes `variables` (orbax) and `card` (JSON) into `out_dir` atomically.

  Args:
    out_dir: destination directory; its parent is created if needed.
    variables: `{'params': ..., 'batch_stats': ...}` pytree of arrays.
    card: JSON-serialisable metadata.
    force: replace an existing `out_dir`, which must be a model directory (`check_writable`).

  Returns:
    `out_dir` as an absolute Path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = pathlib.Path(os.path.abspath(check_writable(out_dir, force)))  # abspath: `..` resolved, links kept
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # Not tempfile.mkdtemp: its 0700 would become the model directory's mode once renamed.
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(8)}"
  tmp.mkdir()
  try:
    tree = _to_numpy(variables)
    ocp.PyTreeCheckpointer().save(tmp / VARIABLES_DIR, tree)
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
      trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.replace(out_dir, trash / "old")
      os.replace(tmp, out_dir)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def read_card(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """The parsed `card.json` of a model directory; a missing, unparsable or non-object card is a `ModelDirError`."""
  path = pathlib.Path(model_dir) / CARD_FILE
  if not path.is_file():
    raise ModelDirError(f"{model_dir} is not a converted model directory (no {CARD_FILE}); create one with "
                        "`python -m tools.convert_torch_weights --arch ARCH --checkpoint FILE --out DIR`")
  try:
    card = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ModelDirError(f"{path} is not valid JSON ({e}); restore it, or convert the model again") from None
  if not isinstance(card, dict):
    raise ModelDirError(f"{path} holds a JSON {type(card).__name__}, not the model card's object; restore it, or "
                        "convert the model again")
  return card


def write_card(model_dir: str | os.PathLike[str], card: Mapping[str, Any]) -> None:
  """Replaces `card.json` atomically (write a temporary file, then rename)."""
  path = pathlib.Path(model_dir) / CARD_FILE
  tmp = path.with_name(f".{CARD_FILE}.tmp")
  tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def read_model_dir(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads `(variables, card)` from a directory written by `write_model_dir` (numpy leaves)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  card = read_card(model_dir)
  if not (model_dir / VARIABLES_DIR).is_dir():
    raise ModelDirError(f"{model_dir}: no {VARIABLES_DIR}/ checkpoint beside {CARD_FILE}; convert the model again")
  variables = ocp.PyTreeCheckpointer().restore((model_dir / VARIABLES_DIR).absolute())
  return _to_numpy(variables), card
