"""MTCNN weights: loading the converted copies bundled with the package, and regenerating them.

The bundled model directories `erasablemask_jax/assets/mtcnn/{pnet,rnet,onet}/` (orbax `variables/` + `card.json`, as
written by `erasablemask_jax.convert.write_model_dir`) were converted from facenet-pytorch's `data/{pnet,rnet,onet}.pt`
(MIT, (c) 2019 Timothy Esler; notice in `assets/mtcnn/LICENSE`) with the project's converter, by
`python -m erasablemask_jax.align.weights SRC_DIR` (needs torch), which runs the same code as
`python -m tools.convert_torch_weights --arch mtcnn_<net> --checkpoint <net>.pt --out assets/mtcnn/<net>` for each net
(the architectures and their rename rules are in `erasablemask_jax.align.archs`).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

from erasablemask_jax import convert
from erasablemask_jax.align import archs
from erasablemask_jax.align.archs import NETS

ASSET_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "mtcnn"

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
