"""The command line as a new user meets it: --version, quiet logs, the compile cache, one-line errors, the last line.

Errors are one line on stderr with exit status 2 (usage, config) or 1 (runtime); commands that write end with
`erasablemask CMD: outputs in PATH (...)`. Training itself is faked where only the CLI's handling is under test.
"""

import errno
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from erasablemask_jax import __version__
from erasablemask_jax import cli
from erasablemask_jax.commands import _outputs

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL")}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def _one_line(err: str) -> str:
  assert err.count("\n") == 1 and "Traceback" not in err, err
  return err


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.startswith(f"erasablemask {__version__} (jax ")
  out = subprocess.run(["erasablemask", "--version"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and out.stdout.startswith(f"erasablemask {__version__}")


def test_noisy_loggers_are_quiet_unless_verbose():
  try:
    cli.configure_logging(verbose=False)
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.WARNING for n in cli.NOISY_LOGGERS)
    cli.configure_logging(verbose=True)
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.INFO for n in cli.NOISY_LOGGERS)
  finally:
    cli.configure_logging(verbose=False)


@pytest.mark.parametrize("verbose", [False, True])
def test_xla_cpp_log_lines_are_hidden_unless_verbose(verbose):
  """XLA's C++ ERROR lines ("Very slow compile?", here a dump folder it cannot create) only with --verbose."""
  code = textwrap.dedent(f"""\
      from erasablemask_jax import cli
      cli.quiet_native_logs({['--verbose'] if verbose else []!r})
      import jax
      print(jax.jit(lambda x: x + 1)(1.0))
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env=_env(XLA_FLAGS="--xla_dump_to=/proc/no/such/dir"))
  assert out.returncode == 0, out.stderr
  assert ("Could not create directory" in out.stderr) == verbose, out.stderr


@pytest.mark.parametrize("jax_first", [False, True])
def test_compile_cache_under_the_user_cache_folder(tmp_path, jax_first):
  code = textwrap.dedent(f"""\
      {'import jax' if jax_first else ''}
      from erasablemask_jax import cli
      folder = cli.use_compile_cache(True)
      import jax
      jax.jit(lambda x: x * 3 + 1)(2.0).block_until_ready()
      print(folder, jax.config.jax_compilation_cache_dir)
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env=_env(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
  assert out.returncode == 0, out.stderr
  folder = tmp_path / "erasablemask" / "xla"
  assert out.stdout.split() == [str(folder)] * 2
  assert any(folder.iterdir()), "nothing was cached"


@pytest.mark.parametrize("argv", [["--no-compile-cache", "config", "--config", "smoke"],
                                  ["config", "--config", "smoke", "--no-compile-cache"]])
def test_no_compile_cache_opts_out(argv, monkeypatch, capsys):
  seen = []
  monkeypatch.setattr(cli, "use_compile_cache", seen.append)
  assert cli.main(argv) == 0
  assert seen == [False]
  assert cli.main(["config", "--config", "smoke"]) == 0 and seen == [False, True]
  capsys.readouterr()


def test_a_batch_that_does_not_divide_over_the_devices_is_a_config_error(tmp_path):
  out = subprocess.run([sys.executable, "-m", "erasablemask_jax.cli", "train", "--config", "smoke",
                        "--config.data.batch_size=3", "--config.data.manual_dir=bundled:sample_faces",
                        "--workdir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), cwd=tmp_path)
  assert out.returncode == 2, out.stderr
  err = _one_line(out.stderr)
  assert "config error: data.batch_size=3 does not divide over 2 devices" in err and "--config.data.batch_size" in err


def _fake_trainer(monkeypatch, run):
  from erasablemask_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel

  class FakeTrainer:
    surrogates = ()

    def __init__(self, config, workdir):
      self.workdir = pathlib.Path(workdir)

    def run(self):
      return run(self)

  monkeypatch.setattr(trainer_lib, "Trainer", FakeTrainer)
  return trainer_lib


def _train(workdir):
  return ["train", "--config", "smoke", "--workdir", str(workdir)]


def test_train_ends_with_where_its_outputs_are(tmp_path, monkeypatch, capsys):
  _fake_trainer(monkeypatch, lambda self: None)
  assert cli.main(_train(tmp_path / "run")) == 0
  last = capsys.readouterr().out.splitlines()[-1]
  assert last == f"erasablemask train: outputs in {tmp_path / 'run'} ({cli_train_outputs()})"


def test_train_report_scores_the_configs_report_models_beside_the_surrogates(tmp_path, monkeypatch, capsys):
  """`erasablemask train` hands `fr.report_models` (loaded by `report.load_report_models`) to the closing report."""
  from erasablemask_jax.commands import train as train_cmd  # pylint: disable=import-outside-toplevel
  from erasablemask_jax.train import report as report_lib  # pylint: disable=import-outside-toplevel

  trainer_lib = _fake_trainer(monkeypatch, lambda self: "state")
  trainer_lib.Trainer.surrogates, trainer_lib.Trainer.targets = ["surrogate"], ["target"]
  trainer_lib.Trainer.models, trainer_lib.Trainer.target_images = "models", "target images"
  trainer_lib.Trainer.config = property(lambda self: self._config)
  trainer_lib.Trainer.report_faces = lambda self: {"images": "faces", "att_a": "att", "split": "held-out"}
  original_init = trainer_lib.Trainer.__init__

  def init(self, config, workdir):
    original_init(self, config, workdir)
    self._config = config

  monkeypatch.setattr(trainer_lib.Trainer, "__init__", init)
  calls = {}

  def load(config, surrogates, target_images):
    calls["load"] = (tuple(config.fr.report_models), surrogates, target_images)
    return ["blackbox"], ["blackbox target"], {"shared:x": "why"}

  monkeypatch.setattr(report_lib, "load_report_models", load)
  monkeypatch.setattr(report_lib, "whitebox_report", lambda *a, **k: calls.setdefault("report", (a, k)))
  monkeypatch.setattr(report_lib, "format_report", lambda report: "the report")
  monkeypatch.setattr(train_cmd, "_photos", lambda trainer: None)
  assert cli.main(_train(tmp_path / "run") + ["--config.fr.report_models=('shared:*',)"]) == 0
  assert calls["load"] == (("shared:*",), ["surrogate"], "target images")
  args, kwargs = calls["report"]
  assert args == ("models", "state", ["surrogate"], ["target"])
  assert kwargs["blackbox"] == ["blackbox"] and kwargs["blackbox_targets"] == ["blackbox target"]
  assert kwargs["not_scored"] == {"shared:x": "why"} and kwargs["images"] == "faces"
  assert "the report" in capsys.readouterr().out


def cli_train_outputs():
  from erasablemask_jax.commands import train  # pylint: disable=import-outside-toplevel
  return train.OUTPUTS


def test_train_interrupted_says_how_to_resume(tmp_path, monkeypatch, capsys):
  trainer_lib = _fake_trainer(monkeypatch, lambda self: (_ for _ in ()).throw(
      trainer_lib.TrainingInterrupted(7, self.workdir / "checkpoints")))
  assert cli.main(_train(tmp_path / "run")) == 130
  err = _one_line(capsys.readouterr().err)
  assert f"saved a checkpoint at step 7 in {tmp_path / 'run' / 'checkpoints'}; rerun the same command" in err


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.workdir / "checkpoints" / "4"))

  _fake_trainer(monkeypatch, full)
  assert cli.main(_train(tmp_path / "run")) == 1
  err = _one_line(capsys.readouterr().err)
  assert err == (f"erasablemask train: {tmp_path / 'run' / 'checkpoints' / '4'}: No space left on device; free some "
                 "space or write to another disk\n")


def _argv(command, tmp_path, out):
  """Arguments of `command` that reach its output check with `out` as the output location."""
  faces = tmp_path / "faces"
  faces.mkdir(exist_ok=True)
  return {
      "train": ["train", "--config", "smoke", "--workdir", str(out)],
      "protect": ["protect", "--workdir", str(tmp_path / "run"), "--in", str(faces), "--out", str(out)],
      "erase": ["erase", "--workdir", str(tmp_path / "run"), "--in", str(faces), "--out", str(out)],
      "align": ["align", str(faces), str(out)],
      "calibrate": ["calibrate", "--fr", "bundled:mobilefacenet", "--faces", str(faces), "--identities",
                    str(tmp_path / "ids.txt"), "--out", str(out / "cal.json")],
  }[command]


COMMANDS = ["train", "protect", "erase", "align", "calibrate"]
FLAGS = {"train": "--workdir", "protect": "--out", "erase": "--out", "align": "OUT_DIR", "calibrate": "--out"}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_folder_that_is_a_file_is_one_line(command, tmp_path, capsys):
  blocker = tmp_path / "taken"
  blocker.write_text("a file")
  assert cli.main(_argv(command, tmp_path, blocker)) == 1
  err = _one_line(capsys.readouterr().err)
  assert err.startswith(f"erasablemask {command}: {FLAGS[command]} {blocker}") and "is a file" in err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("code, words", [(errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied")])
def test_a_read_only_output_folder_is_one_line(command, code, words, tmp_path, monkeypatch, capsys):
  """Injected: root (as in CI containers) ignores permission bits, and mounting a read-only folder needs privileges."""
  def refuse(folder):
    raise OSError(code, os.strerror(code), str(folder))

  monkeypatch.setattr(_outputs, "_probe", refuse)
  assert cli.main(_argv(command, tmp_path, tmp_path / "out")) == 1
  err = _one_line(capsys.readouterr().err)
  assert f"erasablemask {command}: {FLAGS[command]} {tmp_path / 'out'}" in err
  assert f"({words}); choose a writable location" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_refused(tmp_path, capsys):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  try:
    assert cli.main(_argv("align", tmp_path, locked / "out")) == 1
    assert "permission denied" in _one_line(capsys.readouterr().err)
  finally:
    locked.chmod(0o755)


@pytest.mark.parametrize("argv", [
    ["protect", "--workdir", "w", "--in", "i", "--out", "o", "--batch-size", "0"],
    ["erase", "--workdir", "w", "--in", "i", "--out", "o", "--batch-size", "-2"],
    ["evaluate", "--workdir", "w", "--data", "d", "--fr", "f", "--out", "o", "--batch-size", "0"],
    ["calibrate", "--fr", "f", "--faces", "d", "--pairs", "p", "--out", "o", "--batch-size", "0"],
    ["align", "i", "o", "--size", "0"],
    ["align", "i", "o", "--min-face", "-3"],
    ["protect", "--workdir", "w", "--in", "i", "--out", "o", "--batch-size", "many"],
])
def test_zero_or_negative_sizes_on_the_command_line_are_usage_errors(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "error: argument" in err and "expected" in err and "Traceback" not in err


def test_evaluate_with_facepp_but_no_keys_is_a_usage_error_before_any_work(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv("FACEPP_API_KEY", raising=False)
  monkeypatch.delenv("FACEPP_API_SECRET", raising=False)
  argv = ["evaluate", "--workdir", str(tmp_path / "no-run"), "--data", "d", "--fr", "bundled:mobilefacenet", "--out",
          str(tmp_path / "out"), "--remote-api", "facepp"]
  assert cli.main(argv) == 2
  err = _one_line(capsys.readouterr().err)
  assert "set FACEPP_API_KEY and FACEPP_API_SECRET" in err
  assert not (tmp_path / "out").exists()
