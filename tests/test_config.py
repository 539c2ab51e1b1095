"""Config loading, overrides and their errors; the CLI skeleton."""

import json
import subprocess
import sys

import pytest

from configs import default
from erasablemask_jax import cli
from erasablemask_jax.config import ConfigError, load_config


def test_default_holds_the_paper_settings():
  c = default.get_config()
  assert c.image_size == 256 and len(c.attributes) == 13 and c.attributes[0] == "Bald" and c.attributes[-1] == "Young"
  assert (c.model.beta, c.model.gamma, c.loss.sigma1, c.loss.epsilon) == (0.5, 0.05, 30.0, 0.0)
  assert (c.loss.l_att, c.loss.l_rec, c.loss.l_g, c.loss.l_adv, c.loss.l_era, c.loss.l_perb) == (10, 150, 1, 200, 150, 1)
  assert (c.schedule.stage1_epochs, c.schedule.stage2_epochs, c.schedule.stage3_epochs) == (200, 100, 50)
  assert (c.optim.lr, c.optim.b1, c.optim.b2) == (2e-5, 0.5, 0.999)


def test_overrides_convert_to_the_field_type():
  c = load_config("configs/smoke.py", ["--config.model.gamma=0.1", "--config.data.batch_size=8",
                                       "--config.attack.first_order=true", "--config.fr.surrogates=a,b",
                                       "--config.noise.train_pool=('identity','jpeg50')"])
  assert c.model.gamma == 0.1 and c.data.batch_size == 8 and c.attack.first_order is True
  assert c.fr.surrogates == ("a", "b") and c.noise.train_pool == ("identity", "jpeg50")
  assert load_config("smoke").image_size == 32  # packaged names resolve


@pytest.mark.parametrize("override, message", [
    ("--config.model.gama=0.1", "unknown config key 'model.gama'; did you mean model.gamma"),
    ("--config.nosuch.x=1", "unknown config key 'nosuch.x'"),
    ("--config.model.gamma=high", "'model.gamma' expects a float"),
    ("--config.data.batch_size=2.5", "'data.batch_size' expects a int"),
    ("--config.attack.first_order=maybe", "'attack.first_order' expects a bool"),
    ("--config.model=1", "is a group"),
    ("--config.model.gamma", "has no '='"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    load_config("configs/smoke.py", [override])


def test_missing_config_file_lists_packaged_ones():
  with pytest.raises(ConfigError, match="not found.*default"):
    load_config("configs/nope.py")


def test_cli_config_prints_resolved_json(capsys):
  assert cli.main(["config", "--config", "configs/smoke.py", "--config.model.beta=0.25", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["model"]["beta"] == 0.25


def test_cli_reports_config_errors_and_unknown_flags(capsys):
  assert cli.main(["config", "--config", "configs/smoke.py", "--config.model.bta=1"]) == 2
  assert "unknown config key 'model.bta'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["config", "--config", "configs/smoke.py", "--bogus"])


def test_installed_console_script_help_and_describe():
  out = subprocess.run(["erasablemask", "--help"], capture_output=True, text=True,
                       check=True).stdout
  assert "config" in out and "describe" in out
  out = subprocess.run([sys.executable, "-m", "erasablemask_jax.cli", "describe", "--config", "default"],
                       capture_output=True, text=True, check=True).stdout
  assert "E_adv" in out and "11,148,160" in out


@pytest.mark.parametrize("spec, message", [
    ("some/missing/path/demo.py", "config file some/missing/path/demo.py not found (for the packaged one, write "
                                  "--config demo)"),
    ("demo.py", "config file demo.py not found (for the packaged one, write --config demo)"),
    ("configs/nope.py:arg", "config file configs/nope.py not found;"),
    ("nope", "no packaged config named 'nope'; the packaged ones are .*demo"),
    ("configs", "no packaged config named 'configs'"),
])
def test_a_missing_path_is_an_error_never_a_packaged_config(spec, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    load_config(spec)


def test_packaged_names_are_bare_and_paths_must_be_python_files(tmp_path, capsys):
  assert load_config("smoke:ignored").image_size == 32
  (tmp_path / "notes.txt").write_text("get_config = None\n")
  with pytest.raises(ConfigError, match="is not a .py file"):
    load_config(str(tmp_path / "notes.txt"))
  mine = tmp_path / "demo.py"  # a user's own file that shares a packaged name is read, not the packaged one
  mine.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict({'image_size': 48})\n")
  assert load_config(str(mine)).image_size == 48
  assert cli.main(["config", "--config", str(tmp_path / "missing" / "demo.py")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "config error: config file" in err and "not found" in err
