"""`python -m tools.convert_torch_weights --arch ARCH --checkpoint FILE --out DIR [--symbol FILE] [--force]`.

Converts a PyTorch face-recognition (or any registered) checkpoint, an MXNet `PREFIX-EPOCH.params` one (e.g.
`--arch mobileface_v2`, checked against `PREFIX-symbol.json` beside it or `--symbol`), or a TensorFlow.js graph model
(`--arch tfjs --checkpoint model.json [--output NODE] [--input NODE] [--preprocess ORDER:NORM]`) into an orbax +
`card.json` model directory that `erasablemask_jax.fr.load(DIR)` reads. The logic lives in
`erasablemask_jax.convert.convert_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys

from erasablemask_jax import convert
from erasablemask_jax.align import archs as _mtcnn_archs  # noqa: F401  (registers mtcnn_*)
from erasablemask_jax.fr import archs as _fr_archs  # noqa: F401  (registers the face-recognition zoo)
from erasablemask_jax.metrics import archs as _metric_archs  # noqa: F401  (registers lpips_*, fid_inception)


def build_parser() -> argparse.ArgumentParser:
  archs = convert.list_archs()
  parser = argparse.ArgumentParser(
      prog="python -m tools.convert_torch_weights",
      description="Convert a PyTorch checkpoint (.pth/.pt/.ckpt via torch.load(weights_only=True), or .safetensors), "
                  "an MXNet PREFIX-EPOCH.params file or a TF.js graph model.json (both read with numpy) into an "
                  "orbax checkpoint + card.json directory.")
  parser.add_argument("--arch", required=True, choices=archs, metavar="ARCH",
                      help="architecture of the checkpoint: " + ", ".join(archs))
  parser.add_argument("--checkpoint", required=True,
                      help="PyTorch, safetensors or MXNet .params weights file, or a TF.js model.json")
  parser.add_argument("--symbol", default=None,
                      help="MXNet only: the -symbol.json graph to check the .params against (default: "
                           "PREFIX-symbol.json beside PREFIX-EPOCH.params, when present)")
  parser.add_argument("--output", default=None, metavar="NODE",
                      help="TF.js only: the graph node whose value is the embedding (needed when the graph has several "
                           "outputs and is not a known model)")
  parser.add_argument("--input", default=None, metavar="NODE",
                      help="TF.js only: the Placeholder that takes the image (needed when the graph has several)")
  parser.add_argument("--preprocess", default=None, metavar="ORDER:NORM",
                      help="TF.js only: channel order (rgb, bgr) and normalisation (raw = pixels 0..255, unit, sym, "
                           "arc, caffe = minus the Caffe BGR means, imagenet) the graph expects; known models bring "
                           "their own")
  parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  parser.add_argument("--force", action="store_true", help="replace an existing output directory")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    out = convert.convert_checkpoint(args.arch, args.checkpoint, args.out, force=args.force, symbol=args.symbol,
                                     input_name=args.input, output_name=args.output, preprocess=args.preprocess)
  except (FileNotFoundError, convert.CheckpointError, convert.ModelDirError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  card = convert.read_card(out)
  symbol = card["source"].get("symbol")
  graph = card.get("tfjs")
  extra = (f", graph {card.get('name')}: {graph['input']} -> {graph['output']}, {sum(graph['ops'].values())} ops, "
           f"preprocess {graph['preprocess']}" if graph else "")
  print(f"wrote {out} (arch {card['arch']}, input {card.get('input_size')}, embedding {card.get('embedding_size')}, "
        f"source sha256 {card['source']['sha256'][:12]}...{', checked against ' + symbol['file'] if symbol else ''}"
        f"{extra})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
