"""MTCNN weights: the facenet-pytorch -> Flax rename tables, and loading the converted copies bundled with the package.

The bundled files `erasablemask_jax/assets/mtcnn/{pnet,rnet,onet}.safetensors` were converted from facenet-pytorch's
`data/{pnet,rnet,onet}.pt` (MIT, (c) 2019 Timothy Esler; notice in `assets/mtcnn/LICENSE`) by
`python -m erasablemask_jax.align.weights SRC_DIR` (needs torch). Keys are Flax parameter paths joined with '/'.

Conversion rules (a torch key with no rule is an error):
  `convN.weight` (O, I, kh, kw) -> `convN/kernel` (kh, kw, I, O);   `convN.bias` -> `convN/bias`
  `denseN.weight` (O, I)        -> `denseN/kernel` (I, O);          `denseN.bias` -> `denseN/bias`
  `preluN.weight` (C,)          -> `preluN/weight` (C,)
"""

from __future__ import annotations

import functools
import pathlib
import re
import sys
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from erasablemask_jax.align import mtcnn

ASSET_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "mtcnn"
NETS = ("pnet", "rnet", "onet")

# (torch key pattern, flax path template, array transform).
RENAME_RULES: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"^(conv[\w]+)\.weight$", r"\1/kernel", lambda w: np.transpose(w, (2, 3, 1, 0))),
    (r"^(dense[\w]+)\.weight$", r"\1/kernel", lambda w: np.transpose(w, (1, 0))),
    (r"^(conv[\w]+|dense[\w]+)\.bias$", r"\1/bias", lambda b: b),
    (r"^(prelu\d+)\.weight$", r"\1/weight", lambda a: a),
)


def rename_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Applies `RENAME_RULES` to a facenet-pytorch MTCNN state dict (numpy arrays). Raises on an unknown key."""
  out = {}
  for key, value in state_dict.items():
    for pattern, template, fn in RENAME_RULES:
      if re.match(pattern, key):
        out[re.sub(pattern, template, key)] = np.ascontiguousarray(fn(np.asarray(value, np.float32)))
        break
    else:
      raise KeyError(f"no MTCNN rename rule for torch key {key!r}")
  return out


def abstract_params(net: str) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat `{path: ShapeDtypeStruct}` of `net`'s parameters, from `jax.eval_shape` of its init."""
  module = mtcnn.MODULES[net]()
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(mtcnn.INPUT_SHAPES[net]))
  return traverse_util.flatten_dict(shapes["params"], sep="/")


def strict_params(net: str, flat: Mapping[str, np.ndarray]) -> dict:
  """Checks `flat` against the module's parameters (names and shapes, both ways) and returns the nested pytree."""
  expected = abstract_params(net)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in set(expected) & set(flat) if tuple(expected[k].shape) != tuple(flat[k].shape))
  if missing or unexpected or wrong:
    raise ValueError(
        f"MTCNN {net} weights do not match the Flax module: missing={missing} unexpected={unexpected} "
        f"wrong_shape={[(k, flat[k].shape, expected[k].shape) for k in wrong]}"
    )
  return {"params": traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")}


@functools.cache
def load_bundled(net: str) -> dict:
  """Loads the bundled converted weights of `net` ('pnet' | 'rnet' | 'onet') as a `{'params': ...}` pytree."""
  from safetensors.numpy import load_file

  path = ASSET_DIR / f"{net}.safetensors"
  if not path.is_file():
    raise FileNotFoundError(
        f"bundled MTCNN weights {path} are missing; reinstall the package or regenerate them with "
        "`python -m erasablemask_jax.align.weights <dir with facenet-pytorch pnet.pt/rnet.pt/onet.pt>`"
    )
  return strict_params(net, load_file(str(path)))


def convert_from_torch(src: dict[str, pathlib.Path], dst_dir: pathlib.Path) -> None:
  """Converts facenet-pytorch `.pt` state dicts (`{'pnet': path, ...}`) to checked safetensors files in `dst_dir`."""
  import torch
  from safetensors.numpy import save_file

  dst_dir.mkdir(parents=True, exist_ok=True)
  for net, path in src.items():
    state = torch.load(path, map_location="cpu", weights_only=True)
    flat = rename_torch_state_dict({k: v.numpy() for k, v in state.items()})
    strict_params(net, flat)  # raises on any mismatch before anything is written
    tmp = dst_dir / f".{net}.safetensors.tmp"
    save_file(flat, str(tmp), metadata={"source": f"facenet-pytorch data/{net}.pt (MIT)", "from": str(path.name)})
    tmp.replace(dst_dir / f"{net}.safetensors")


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print("usage: python -m erasablemask_jax.align.weights SRC_DIR  (holding *pnet.pt, *rnet.pt, *onet.pt)")
    return 2
  src_dir = pathlib.Path(argv[0])
  src = {}
  for net in NETS:
    found = sorted(src_dir.glob(f"*{net}.pt"))
    if len(found) != 1:
      print(f"expected exactly one *{net}.pt in {src_dir}, found {[p.name for p in found]}")
      return 1
    src[net] = found[0]
  convert_from_torch(src, ASSET_DIR)
  print(f"wrote {[str(ASSET_DIR / f'{n}.safetensors') for n in NETS]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
