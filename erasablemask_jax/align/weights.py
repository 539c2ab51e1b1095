"""MTCNN weights: the facenet-pytorch -> Flax rename tables, and loading the converted copies bundled with the package.

The bundled model directories `erasablemask_jax/assets/mtcnn/{pnet,rnet,onet}/` (orbax `variables/` + `card.json`, as
written by `erasablemask_jax.convert.write_model_dir`) were converted from facenet-pytorch's `data/{pnet,rnet,onet}.pt`
(MIT, (c) 2019 Timothy Esler; notice in `assets/mtcnn/LICENSE`) with the project's converter, by
`python -m erasablemask_jax.align.weights SRC_DIR` (needs torch), which runs the same code as
`python -m tools.convert_torch_weights --arch mtcnn_<net> --checkpoint <net>.pt --out assets/mtcnn/<net>` for each net
(the architectures are registered in `erasablemask_jax.align.archs`).

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

from erasablemask_jax import convert
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


def bundled_dir(net: str) -> pathlib.Path:
  """Model directory of the bundled converted `net` ('pnet' | 'rnet' | 'onet'): `assets/mtcnn/<net>/`."""
  if net not in NETS:
    raise KeyError(f"unknown MTCNN network {net!r}; choose one of {NETS}")
  return ASSET_DIR / net


@functools.cache
def load_bundled(net: str) -> dict:
  """Loads the bundled converted weights of `net` ('pnet' | 'rnet' | 'onet') as a `{'params': ...}` pytree.

  The directory is read with the converter's reader (`convert.read_model_dir`) and merged strictly against the Flax
  module (`convert.strict_merge`), so a stale or damaged copy fails here with every mismatch named.
  """
  from erasablemask_jax.align import archs  # pylint: disable=g-import-not-at-top  (archs imports this module)

  directory = bundled_dir(net)
  if not (directory / "card.json").is_file():
    raise FileNotFoundError(
        f"bundled MTCNN weights {directory} are missing; reinstall the package or regenerate them with "
        "`python -m erasablemask_jax.align.weights <dir with facenet-pytorch *pnet.pt, *rnet.pt, *onet.pt>`")
  variables, card = convert.read_model_dir(directory)
  if card.get("arch") != archs.arch_name(net):
    raise convert.ModelDirError(f"{directory}/card.json names arch {card.get('arch')!r}, expected "
                                f"{archs.arch_name(net)!r}; regenerate the bundled MTCNN weights")
  spec = convert.get_arch(archs.arch_name(net))
  abstract = convert.abstract_init(spec.build(), spec.input_shape)
  merged = convert.strict_merge(convert.flatten_variables(variables), abstract, context=str(directory))
  return jax.tree.map(jnp.asarray, merged)


def convert_from_torch(src: dict[str, pathlib.Path], dst_dir: pathlib.Path, force: bool = True) -> list[pathlib.Path]:
  """Converts facenet-pytorch `.pt` state dicts (`{'pnet': path, ...}`) into model dirs `dst_dir/<net>/`.

  Uses the project's converter (`convert.convert_checkpoint` with arch `mtcnn_<net>`): torch.load(weights_only=True),
  the rename table, a strict merge, then an atomic orbax + `card.json` write.
  """
  from erasablemask_jax.align import archs  # pylint: disable=g-import-not-at-top  (archs imports this module)

  out = []
  for net, path in src.items():
    out.append(convert.convert_checkpoint(archs.arch_name(net), path, dst_dir / net, force=force))
  return out


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
  written = convert_from_torch(src, ASSET_DIR)
  print(f"wrote {[str(p) for p in written]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
