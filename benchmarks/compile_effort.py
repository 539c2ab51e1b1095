"""What `erasablemask compile --compile-effort` buys: compile time against the compiled program's figures.

One stage of one config is lowered once for a TPU topology and compiled under each XLA option set in turn, in one
process (so the options are timed side by side under the same load): compile seconds, per-chip memory, FLOPs and the
roofline step time of each (`erasablemask_jax.aot.analyse`). Writes `benchmarks/results/compile_effort.json`, a row
per (stage, options), as each compile finishes; a rerun with the same arguments keeps the rows already there.

    python -m benchmarks.compile_effort                          # the demo config, v5e:2x2, stages 3 and 2
    python -m benchmarks.compile_effort --config smoke --stages 2 --topology v4:2x2x2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from benchmarks import results

# Name -> XLA compile options (`jax.stages.Lowered.compile(compiler_options=...)`).
OPTIONS = {
    "default": {},
    "effort_-1": {"exec_time_optimization_effort": -1.0},
    "effort_-1_memory_-1": {"exec_time_optimization_effort": -1.0, "memory_fitting_effort": -1.0},
    "no_latency_hiding_scheduler": {"xla_tpu_enable_latency_hiding_scheduler": False},
}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="demo")
  ap.add_argument("--topology", default="v5e:2x2")
  ap.add_argument("--stages", default="3,2", help="stages to compile, in order")
  ap.add_argument("--options", default="default,effort_-1", help=f"option sets, in order: {','.join(OPTIONS)}")
  ap.add_argument("--out", default=results.out_path("compile_effort.json"))
  args = ap.parse_args(argv)
  names = args.options.split(",")
  unknown = [n for n in names if n not in OPTIONS]
  if unknown:
    ap.error(f"--options: unknown {unknown}; choose from {list(OPTIONS)}")
  load = os.getloadavg()

  from erasablemask_jax import aot  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.config import load_config  # pylint: disable=import-outside-toplevel

  aot.keep_host_on_cpu()

  out = pathlib.Path(args.out)
  key = {"config": args.config, "topology": args.topology}
  rows = []
  if out.is_file():
    old = json.loads(out.read_text())
    if {k: old.get(k) for k in key} == key:
      rows = old["rows"]
  have = {(r["stage"], r["options"]) for r in rows}
  todo = [(int(s), n) for s in args.stages.split(",") for n in names if (int(s), n) not in have]

  def write():
    results.write_report(out, "compile_effort", argv, {
        **key, "what": "one stage lowered once and compiled under each option set in one process: compile seconds and "
                       "the compiled program's per-chip figures", "rows": rows}, load)

  if todo:
    chip = aot.chip_of(args.topology)
    devices = aot.topology_devices(args.topology)
    _, _, progs = aot.programs(load_config(args.config), devices, len({d.process_index for d in devices}))
    for stage in dict.fromkeys(s for s, _ in todo):
      fn, fn_args = progs[str(stage)]
      lowered = fn.lower(*fn_args)
      for stage_, name in todo:
        if stage_ != stage:
          continue
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=OPTIONS[name] or None)
        rows.append({"stage": stage, "options": name, "compiler_options": OPTIONS[name],
                     "compile_s": time.perf_counter() - start, **aot.analyse(compiled, chip)})
        write()
        r = rows[-1]
        print(f"stage {stage} {name:<28} compile {r['compile_s']:7.1f} s  total "
              f"{r['per_chip_bytes']['total'] / 2**30:.3f} GiB  {r['flops'] / 1e9:8.2f} GFLOP  roofline "
              f"{r['roofline_s'] * 1e3:.2f} ms", flush=True)
  write()
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
