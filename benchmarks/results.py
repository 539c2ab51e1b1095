"""Where a benchmark's JSON goes and how it is written: under `benchmarks/results/`, with the machine, the command that
reproduces it and the load, never half-written in place of a good one (`write_report`)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

RESULTS_DIR = "benchmarks/results"  # relative to the repository root, where the scripts are run from


def out_path(name: str) -> str:
  """The default place of a benchmark's output `name`: `benchmarks/results/<name>`."""
  return f"{RESULTS_DIR}/{name}"


def write_json(path: str | os.PathLike[str], report: Any, indent: int = 1) -> pathlib.Path:
  """`report` as JSON at `path` (parent folders made): written beside it, then moved over it in one step."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(report, indent=indent) + "\n")
  os.replace(tmp, path)
  return path


def machine(load_average_start: tuple[float, ...] | None = None, **extra: Any) -> dict[str, Any]:
  """What a report says about where it ran: platform, cores, JAX's backend and devices, load averages (at the start,
  when given, and now), plus `extra` (torch threads, ...)."""
  import platform  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  out = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
         "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
  if load_average_start is not None:
    out["load_average_start"] = list(load_average_start)
  return {**out, "load_average": list(os.getloadavg()), **extra}


def command(module: str, argv: list[str] | None) -> str:
  """The command line that reproduces a run of `python -m benchmarks.<module>` with `argv` (default: sys.argv)."""
  import sys  # pylint: disable=g-import-not-at-top

  return " ".join(["python -m benchmarks." + module, *(sys.argv[1:] if argv is None else argv)])


def write_report(path: str | os.PathLike[str], module: str, argv: list[str] | None, body: dict[str, Any],
                 load_average_start: tuple[float, ...] | None = None, **machine_extra: Any) -> pathlib.Path:
  """`{"machine": machine(...), "command": command(module, argv), **body}` written to `path` by `write_json`."""
  report = {"machine": machine(load_average_start, **machine_extra), "command": command(module, argv), **body}
  return write_json(path, report)
