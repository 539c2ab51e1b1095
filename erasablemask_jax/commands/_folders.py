"""What `protect` and `erase` share: the run/folder arguments and one error-reporting wrapper around the work."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from erasablemask_jax.commands import _args
from erasablemask_jax.commands import _outputs


def add_run_and_folder_args(p: argparse.ArgumentParser, *, workdir_help: str, in_help: str, out_help: str) -> None:
  """`--workdir`, `--in`, `--out`, `--force`, `--batch-size` and `--step`."""
  p.add_argument("--workdir", required=True, help=workdir_help)
  p.add_argument("--in", dest="in_dir", required=True, help=in_help)
  p.add_argument("--out", required=True, help=out_help)
  p.add_argument("--force", action="store_true", help="overwrite existing outputs")
  p.add_argument("--batch-size", type=_args.positive_int, default=16, help="images per jitted call")
  p.add_argument("--step", type=_args.non_negative_int, default=None, help="checkpoint step (default: the latest)")


def run_on_folder(command: str, args, work: Callable[[Any], Any], check: Callable[[], None] = lambda: None,
                  outputs: str = "") -> int:
  """Checks the arguments (`check`), loads the run, calls `work(loaded_run)` and prints its summary, then a line
  naming --out and what is in it (`outputs`).

  An --out that is --in, or inside it, is refused first, as a usage error (exit status 2): with --force the outputs
  would overwrite the originals, and without it they would mix with them (and be read as inputs next time).

  Bad input (a missing run or folder, an existing output without --force, a malformed label file or attribute spec,
  an --out that is a file or cannot be written) is one line on stderr naming the command, and exit status 1; so is a
  folder where nothing could be written. The last line of a run names the output folder.
  """
  from erasablemask_jax.data.labels import LabelFileError  # pylint: disable=import-outside-toplevel
  from erasablemask_jax import inference  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.inference import attributes  # pylint: disable=import-outside-toplevel

  inside = _output_inside_input(args.in_dir, args.out)
  if inside is not None:
    print(f"erasablemask {command}: the output is the input: --out {args.out} {inside} --in {args.in_dir}, so the "
          "originals would be overwritten or mixed with the outputs; choose an --out outside --in", file=sys.stderr)
    return 2
  try:
    _outputs.check_writable(args.out, "--out")
    check()
    result = work(inference.load_run(args.workdir, args.step, args.batch_size))
  except (FileNotFoundError, FileExistsError, _outputs.OutputLocationError, LabelFileError,
          attributes.AttributeSpecError) as e:
    print(f"erasablemask {command}: {e}", file=sys.stderr)
    return 1
  print(f"{command}: {result.summary()}")
  print(_outputs.outputs_line(command, args.out, outputs))
  return 0 if result.written else 1


def _output_inside_input(in_dir: str, out_dir: str) -> str | None:
  """'is' or 'is inside' when `out_dir` is `in_dir` or under it (after resolving links and `..`), else None."""
  in_path, out_path = pathlib.Path(in_dir).resolve(), pathlib.Path(out_dir).resolve()
  if out_path == in_path:
    return "is"
  return "is inside" if in_path in out_path.parents else None
