"""`python -m tools.convert_torch_weights --arch ARCH --checkpoint FILE --out DIR [--force]`.

Converts a PyTorch face-recognition (or any registered) checkpoint into an orbax + `card.json` model directory that
`erasablemask_jax.fr.load(DIR)` reads. The logic lives in `erasablemask_jax.convert.convert_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys

from erasablemask_jax import convert


def build_parser() -> argparse.ArgumentParser:
  archs = convert.list_archs()
  parser = argparse.ArgumentParser(
      prog="python -m tools.convert_torch_weights",
      description="Convert a PyTorch checkpoint (.pth/.pt/.ckpt via torch.load(weights_only=True), or .safetensors) "
                  "into an orbax checkpoint + card.json directory.")
  parser.add_argument("--arch", required=True, choices=archs, metavar="ARCH",
                      help="architecture of the checkpoint: " + ", ".join(archs))
  parser.add_argument("--checkpoint", required=True, help="PyTorch or safetensors weights file")
  parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  parser.add_argument("--force", action="store_true", help="replace an existing output directory")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    out = convert.convert_checkpoint(args.arch, args.checkpoint, args.out, force=args.force)
  except (FileNotFoundError, convert.CheckpointError, convert.ModelDirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  card = convert.read_card(out)
  print(f"wrote {out} (arch {card['arch']}, input {card.get('input_size')}, embedding {card.get('embedding_size')}, "
        f"source sha256 {card['source']['sha256'][:12]}...)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
