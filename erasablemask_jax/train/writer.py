"""Metrics to TensorBoard event files and a JSONL file (written by process 0 only)."""

from __future__ import annotations

import json
import os
import pathlib
import time

from erasablemask_jax import run_dir


class MetricWriter:
  """`write(step, {name: float})` to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard`.

  Each writer opens its own events file on its first `write` (named by process and time, so a resumed run never
  overwrites an earlier file); after `drop_after(step)` that file starts with TensorBoard's purge marker, a
  `SessionLog.START` at `step + 1`, so TensorBoard hides the earlier files' events past `step`.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._tb_dir = workdir / "tensorboard"
    self._purge_step = None
    self._jsonl = None
    self._jsonl_path = run_dir.metrics_path(workdir)
    if enabled:
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    tb = self._tensorboard()
    for name, value in scalars.items():
      tb.add_scalar(name, float(value), int(step))
    tb.flush()

  def _tensorboard(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self._tb_dir), purge_step=self._purge_step,
                               filename_suffix=f".{time.time_ns()}.{os.getpid()}")
    return self._tb

  def drop_after(self, step: int) -> int:
    """Removes the rows of `metrics.jsonl` past `step`, and any line cut short; returns how many were removed.

    A run resumed from the checkpoint at `step` logs the later steps again, so without this a resume would leave two
    rows for each step that a killed run logged after its last checkpoint. The file is rewritten atomically. The
    TensorBoard events past `step` are hidden by the purge marker this writer's events file will start with (the
    earlier files are never edited).
    """
    if not self.enabled:
      return 0
    if self._tb_dir.is_dir() and any(self._tb_dir.glob("events.out.tfevents.*")):
      if self._tb is not None:
        self._tb.close()
        self._tb = None
      self._purge_step = int(step) + 1
    if not self._jsonl_path.is_file():
      return 0
    lines = self._jsonl_path.read_text(encoding="utf-8").splitlines()
    steps = [run_dir.metrics_row_step(line) for line in lines]
    keep = [line for line, s in zip(lines, steps) if s is not None and s <= step]
    if len(keep) == len(lines):
      return 0
    self._jsonl.close()
    tmp = self._jsonl_path.with_name(f".{self._jsonl_path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, self._jsonl_path)
    self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
    return len(lines) - len(keep)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
