"""Ctrl-C or SIGTERM during training saves the step and says how to resume (a second one stops at once);
metrics.jsonl keeps one row per step across resumes.

A tiny stage-1-only run (16x16, 3-layer networks, no surrogates) on random faces.
"""

import json
import os
import signal

import pytest

import tiny
from erasablemask_jax.train import checkpoint as checkpoint_lib
from erasablemask_jax.train import trainer as trainer_lib
from erasablemask_jax.train.writer import MetricWriter


def _config():
  return tiny.tiny_config(**{"image_size": 16, "model.enc_layers": 3, "model.dec_layers": 3, "model.dis_layers": 3,
                             "data.batch_size": 4, "schedule.stage1_steps": 4, "schedule.stage2_steps": 0,
                             "schedule.stage3_steps": 0, "train.checkpoint_every_steps": 100,
                             "train.log_every_steps": 1, "train.sample_every_steps": 1000})


def _trainer(workdir):
  config = _config()
  return trainer_lib.Trainer(config, workdir, source=tiny.tiny_source(config, n=8))


def _steps(workdir):
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signum, what, status", [(signal.SIGINT, "interrupted", 130),
                                                  (signal.SIGTERM, "stopped by SIGTERM", 143)])
def test_ctrl_c_or_sigterm_saves_the_step_and_a_rerun_resumes_with_one_metrics_row_per_step(tmp_path, signum, what,
                                                                                            status):
  workdir = tmp_path / "run"

  def signal_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signum)

  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with pytest.raises(trainer_lib.TrainingInterrupted) as e:
    _trainer(workdir).run(on_step=signal_at_2)
  assert {s: signal.getsignal(s) for s in before} == before  # the handlers are only installed while training
  assert str(e.value) == (f"{what}: saved a checkpoint at step 2 in {workdir / 'checkpoints'}; rerun the same "
                          "command to resume from it")
  assert isinstance(e.value, KeyboardInterrupt) and e.value.step == 2 and e.value.exit_status == status
  assert checkpoint_lib.restore_run(workdir)[3] == 2
  assert _steps(workdir) == [1, 2]
  # A killed run's rows after its last checkpoint (and a line cut short) are dropped on resume, then logged again.
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
  state = _trainer(workdir).run()
  assert int(state.step) == 4
  assert _steps(workdir) == [1, 2, 3, 4]


def test_a_second_signal_stops_at_once_without_saving(tmp_path):
  workdir = tmp_path / "run"

  def twice_at_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(KeyboardInterrupt) as e:
    _trainer(workdir).run(on_step=twice_at_2)
  assert not isinstance(e.value, trainer_lib.TrainingInterrupted)
  assert not (workdir / "checkpoints" / "2").exists()  # what the last checkpoint (none here) did not hold is lost


def test_drop_after_keeps_rows_up_to_the_step(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 5)))
  writer = MetricWriter(tmp_path)
  assert writer.drop_after(3) == 1
  assert writer.drop_after(3) == 0
  writer.write(4, {"x": 4.0})
  writer.close()
  assert _steps(tmp_path) == [1, 2, 3, 4]


def _tensorboard_view(logdir):
  """The scalars TensorBoard shows for `logdir`: its files in name order, each `SessionLog.START` at step s hiding the
  events read before it at steps >= s (TensorBoard's purge rule). Reads the TFRecord framing directly."""
  import struct

  from tensorboardX.proto import event_pb2

  shown: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append((event.step, value.simple_value))
  return shown


def test_tensorboard_hides_the_events_a_resume_logs_again(tmp_path):
  writer = MetricWriter(tmp_path)
  for step in range(1, 6):
    writer.write(step, {"x": float(step)})
  writer.close()
  # Resumed from the checkpoint at step 3: steps 4 and 5 are logged again, with other values.
  writer = MetricWriter(tmp_path)
  writer.drop_after(3)
  for step in (4, 5, 6):
    writer.write(step, {"x": 10.0 * step})
  writer.close()
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the first file is kept as it was
  assert _tensorboard_view(tmp_path / "tensorboard") == {"x": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                                                               (6, 60.0)]}
  assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
