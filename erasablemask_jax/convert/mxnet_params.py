"""MXNet's `.params` NDArray list, read with numpy alone (what `mx.model.save_checkpoint` writes as PREFIX-EPOCH.params).

Little-endian:

    uint64 0x112 (list magic), uint64 reserved, uint64 count, then `count` arrays, each one of
      v2     uint32 0xF993FAC9, int32 storage type (0 = dense), uint32 ndim, int64 dims[ndim], ...
      v1     uint32 0xF993FAC8, uint32 ndim, int64 dims[ndim], ...
      legacy uint32 ndim (the first word is not a magic), uint32 dims[ndim], ...
    and then (unless ndim == 0, an empty array) int32 dev_type, int32 dev_id, int32 type flag, the raw C-order data;
    after the arrays uint64 count of names and per name uint64 length + bytes (`arg:NAME` / `aux:NAME`).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from erasablemask_jax.convert.state_dict import CheckpointError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
# mshadow type flags; 7 (bool) and above are not written by the MXNet 1.x model zoo.
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}
STORAGE_NAMES = {1: "row_sparse", 2: "csr"}
_MAX_NDIM = 32


def is_params_file(path: str | os.PathLike[str]) -> bool:
  """True for a `.params` file or any file that starts with the NDArray-list header."""
  path = pathlib.Path(path)
  if path.suffix == ".params":
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return False
  return len(head) == 8 and int.from_bytes(head, "little") == LIST_MAGIC


class _Reader:
  """Little-endian reads from bytes, raising `CheckpointError` naming the file when they run past the end."""

  def __init__(self, data: bytes, path: pathlib.Path):
    self.data, self.path, self.pos = data, path, 0

  def fail(self, what: str) -> CheckpointError:
    return CheckpointError(f"{self.path}: not a valid MXNet .params file: {what} (at byte {self.pos} of "
                           f"{len(self.data)}); download it again and check its sha256")

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or self.pos + n > len(self.data):
      raise self.fail(f"truncated while reading {what}: {n} bytes needed, {len(self.data) - self.pos} left")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def ints(self, dtype: str, count: int, what: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.frombuffer(self.take(size * count, what), dtype=dtype, count=count)

  def int(self, dtype: str, what: str) -> int:
    return int(self.ints(dtype, 1, what)[0])


def _read_shape(r: _Reader, dim_dtype: str, ndim: int | None, what: str) -> tuple[int, ...]:
  if ndim is None:
    ndim = r.int("<u4", f"{what} ndim")
  if ndim > _MAX_NDIM:
    raise r.fail(f"{what} has {ndim} dimensions")
  dims = tuple(int(d) for d in r.ints(dim_dtype, ndim, f"{what} shape"))
  if any(d < 0 for d in dims):
    raise r.fail(f"{what} has negative dimensions {dims}")
  return dims


def _read_array(r: _Reader, index: int) -> np.ndarray:
  what = f"array {index}"
  magic = r.int("<u4", f"{what} magic")
  if magic == V2_MAGIC:
    stype = r.int("<i4", f"{what} storage type")
    if stype != 0:
      raise CheckpointError(
          f"{r.path}: array {index} has {STORAGE_NAMES.get(stype, f'storage type {stype}')} storage; only dense "
          "arrays are supported: convert it to dense (`.tostype('default')`) and save again")
    shape = _read_shape(r, "<i8", None, what)
  elif magic == V1_MAGIC:
    shape = _read_shape(r, "<i8", None, what)
  elif magic == V3_MAGIC:
    raise CheckpointError(f"{r.path}: array {index} is in the NDArray v3 (numpy-shape) format, which is not "
                          "supported; save it with MXNet's legacy (non-numpy) shape semantics")
  elif magic <= _MAX_NDIM:  # legacy: the first word is ndim, dims are uint32
    shape = _read_shape(r, "<u4", magic, what)
  else:
    raise r.fail(f"{what} starts with {magic:#010x}, not an NDArray magic (0xf993fac9 / 0xf993fac8) or a legacy ndim")
  if not shape:  # an empty (none) NDArray: nothing follows
    return np.zeros((0,), np.float32)
  r.int("<i4", f"{what} dev_type")
  r.int("<i4", f"{what} dev_id")
  flag = r.int("<i4", f"{what} type flag")
  if flag not in DTYPES:
    raise CheckpointError(f"{r.path}: array {index} has type flag {flag}, which is not supported (supported: "
                          + ", ".join(f"{k} {np.dtype(v).name}" for k, v in DTYPES.items())
                          + "); cast it to float32 and save again")
  dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
  count = int(np.prod(shape, dtype=np.int64))
  data = r.take(count * dtype.itemsize, f"{what} data ({shape}, {dtype.name})")
  return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_ndarray_list(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads an MXNet NDArray-list file (`nd.save`, `.params`) into `{name: array}` in file order.

  Args:
    path: the file.

  Returns:
    `{"arg:conv1_weight": array, "aux:bn1_moving_mean": array, ...}`; a file saved from a list (no names) is keyed
    `"0", "1", ...`. Empty (none) arrays come back as float32 arrays of shape `(0,)`.

  Raises:
    FileNotFoundError: the file does not exist.
    CheckpointError: a one-line message naming the file and the problem (bad magic, truncation, sparse storage,
      unsupported dtype, names that do not match the arrays).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  r = _Reader(path.read_bytes(), path)
  if len(r.data) < 8:
    raise r.fail(f"{len(r.data)} bytes, shorter than the header")
  header = r.int("<u8", "header")
  if header != LIST_MAGIC:
    raise CheckpointError(f"{path}: not an MXNet NDArray file (header {header:#x}, expected {LIST_MAGIC:#x}); "
                          "is it a checkpoint of another framework?")
  r.int("<u8", "reserved")
  count = r.int("<u8", "array count")
  if count > len(r.data):
    raise r.fail(f"array count {count} exceeds the file size")
  arrays = [_read_array(r, i) for i in range(count)]
  n_names = r.int("<u8", "name count")
  if n_names not in (0, count):
    raise r.fail(f"{n_names} names for {count} arrays")
  names = []
  for i in range(n_names):
    length = r.int("<u8", f"name {i} length")
    try:
      names.append(r.take(length, f"name {i}").decode("utf-8"))
    except UnicodeDecodeError as e:
      raise r.fail(f"name {i} is not UTF-8") from e
  if r.pos != len(r.data):
    raise r.fail(f"{len(r.data) - r.pos} trailing bytes after the names")
  names = names or [str(i) for i in range(count)]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise CheckpointError(f"{path}: duplicate array names {dup[:5]}")
  return dict(zip(names, arrays))
