"""Config loading, overrides and their errors; the CLI skeleton."""

import json
import subprocess
import sys
import textwrap

import pytest

from configs import default
from erasablemask_jax import cli
from erasablemask_jax.config import ConfigError, load_config, upgrade_legacy


def test_default_holds_the_paper_settings():
  c = default.get_config()
  assert c.image_size == 256 and len(c.attributes) == 13 and c.attributes[0] == "Bald" and c.attributes[-1] == "Young"
  assert (c.model.beta, c.model.gamma, c.loss.sigma1, c.loss.epsilon) == (0.5, 0.05, 30.0, 0.0)
  assert (c.loss.l_att, c.loss.l_rec, c.loss.l_g, c.loss.l_adv, c.loss.l_era, c.loss.l_perb) == (10, 150, 1, 200, 150, 1)
  assert (c.schedule.stage1_epochs, c.schedule.stage2_epochs, c.schedule.stage3_epochs) == (200, 100, 50)
  assert (c.optim.lr, c.optim.b1, c.optim.b2) == (2e-5, 0.5, 0.999)


def test_overrides_convert_to_the_field_type():
  c = load_config("configs/smoke.py", ["--config.model.gamma=0.1", "--config.data.batch_size=8",
                                       "--config.data.flip=false", "--config.fr.surrogates=a,b",
                                       "--config.noise.train_pool=('identity','jpeg50')"])
  assert c.model.gamma == 0.1 and c.data.batch_size == 8 and c.data.flip is False
  assert c.fr.surrogates == ("a", "b") and c.noise.train_pool == ("identity", "jpeg50")
  assert load_config("smoke").image_size == 32  # packaged names resolve


def test_lr_inner_follows_the_optimiser_lr_until_set():
  assert load_config("smoke").attack.lr_inner == 2e-5
  followed = load_config("smoke", ["--config.optim.lr=3e-4"])
  assert followed.attack.lr_inner == 3e-4 and json.loads(followed.to_json_best_effort())["attack"]["lr_inner"] == 3e-4
  own = load_config("smoke", ["--config.attack.lr_inner=1e-3"])
  assert own.attack.lr_inner == 1e-3 and own.optim.lr == 2e-5  # setting it never writes optim.lr
  assert load_config("demo").attack.lr_inner == load_config("demo").optim.lr == 3e-4  # the demo keeps the paper's one symbol


@pytest.mark.parametrize("saved, kind, lr_inner", [
    ({"kind": "meta_auxiliary", "first_order": True, "lr_inner": -1.0}, "first_order", 3e-4),
    ({"kind": "meta_auxiliary", "first_order": False, "lr_inner": 2e-4}, "meta_auxiliary", 2e-4),
    ({"kind": "ensemble", "first_order": True, "lr_inner": -1.0}, "ensemble", 3e-4),
    ({"kind": "first_order", "lr_inner": 1e-3}, "first_order", 1e-3),
])
def test_legacy_attack_fields_keep_their_meaning(saved, kind, lr_inner):
  tree = upgrade_legacy({"optim": {"lr": 3e-4}, "attack": {**saved, "primaries": "unrolled"}})
  assert tree["attack"] == {"kind": kind, "lr_inner": lr_inner, "primaries": "unrolled"}


def test_a_run_saved_before_the_sharded_state_option_replicated_its_state():
  assert upgrade_legacy({"mesh": {"data": -1}})["mesh"] == {"data": -1, "state": "replicated"}
  assert upgrade_legacy({"mesh": {"data": 8, "state": "sharded"}})["mesh"]["state"] == "sharded"
  assert load_config("smoke").mesh.state == "replicated"
  with pytest.raises(ConfigError, match="mesh.state"):
    load_config("smoke", ["--config.mesh.state=3"])


def test_a_legacy_config_file_loads_with_todays_fields(tmp_path):
  path = tmp_path / "old.py"
  path.write_text(textwrap.dedent('''
      from configs import smoke
      def get_config(arg=None):
        config = smoke.get_config()
        config.attack.first_order = True
        config.attack.lr_inner = -1.0
        return config
  '''))
  c = load_config(str(path), ["--config.optim.lr=5e-4"])
  assert c.attack.kind == "first_order" and "first_order" not in c.attack and c.attack.lr_inner == 5e-4


@pytest.mark.parametrize("override, message", [
    ("--config.model.gama=0.1", "unknown config key 'model.gama'; did you mean model.gamma"),
    ("--config.nosuch.x=1", "unknown config key 'nosuch.x'"),
    ("--config.model.gamma=high", "'model.gamma' expects a float"),
    ("--config.data.batch_size=2.5", "'data.batch_size' expects a int"),
    ("--config.data.flip=maybe", "'data.flip' expects a bool"),
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


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))
  return path


@pytest.mark.parametrize("body, message", [
    ("def get_config(arg=None)\n  return None\n", r"bad\.py, line 1: syntax error \(.*\); fix the config file"),
    ("import no_such_module_here\n", r"bad\.py failed to load at line 1: ModuleNotFoundError: No module named"),
    ("import ml_collections\n\ndef get_config(arg=None):\n  return {}['x']\n",
     r"get_config\(None\) of .*bad\.py failed at line 4: KeyError: 'x'"),
    ("def get_config(arg=None):\n  return {'image_size': 32}\n", r"returned a dict, not an ml_collections.ConfigDict"),
    ("get_config = 3\n", r"defines no get_config\(arg=None\) function"),
])
def test_a_broken_config_file_is_one_config_error_naming_file_and_line(tmp_path, body, message, capsys):
  path = _write(tmp_path / "bad.py", body)
  with pytest.raises(ConfigError, match=message):
    load_config(str(path))
  assert cli.main(["config", "--config", str(path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err and str(path.name) in err


def test_packaged_configs_refuse_an_argument_they_do_not_take():
  with pytest.raises(ConfigError, match=r"get_config\('badarg'\).*the smoke config has no variants \(got 'badarg'\)"):
    load_config("smoke:badarg")
  for name in ("celebahq_paper", "default", "demo"):
    with pytest.raises(ConfigError, match=f"the {name} config has no variants"):
      load_config(f"{name}:x")
  assert load_config("smoke").image_size == 32


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0 (must be >= 1)"),
    ("data.batch_size=-4", "data.batch_size=-4 (must be >= 1)"),
    ("image_size=0", "image_size=0 (must be >= 1)"),
    ("image_size=-32", "image_size=-32 (must be >= 1)"),
    ("model.enc_dim=0", "model.enc_dim=0 (must be >= 1)"),
    ("model.dis_layers=-1", "model.dis_layers=-1 (must be >= 1)"),
    ("train.log_every_steps=0", "train.log_every_steps=0 (must be >= 1)"),
    ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps=-5 (must be >= 1)"),
    ("schedule.stage2_epochs=-1", "schedule.stage2_epochs=-1 (must be >= 0)"),
    ("mesh.data=-2", "mesh.data=-2 (-1 for every device"),
    ("image_size=48", "image_size=48 (must be a multiple of 2**model.enc_layers = 32)"),
])
def test_sizes_and_batch_that_are_not_positive_are_refused_by_key(override, message, capsys):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
    load_config("smoke", [f"--config.{override}"])
  assert cli.main(["describe", "--config", "smoke", f"--config.{override}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "config error: invalid config value" in err


def test_no_folder_near_a_config_shadows_an_installed_library(tmp_path):
  """A `tqdm.py` beside a user's config directory used to be imported instead of tqdm (its grandparent went first on
  sys.path); the config's own `from configs import ...` still finds the packaged base and the user's sibling file."""
  planted = tmp_path / "exp"
  _write(planted / "tqdm.py", "raise SystemExit('planted tqdm.py was imported')\n")
  _write(planted / "configs" / "my_base.py", """\
      from configs import smoke

      def get_config(arg=None):
        config = smoke.get_config()
        config.image_size = 64
        return config
      """)
  mine = _write(planted / "configs" / "mine.py", """\
      from configs import my_base

      def get_config(arg=None):
        return my_base.get_config()
      """)
  code = textwrap.dedent(f"""\
      import sys
      from erasablemask_jax.config import load_config
      config = load_config({str(mine)!r})
      assert config.image_size == 64, config.image_size
      assert not any(p.startswith({str(tmp_path)!r}) for p in sys.path), sys.path
      import tqdm
      print(tqdm.__file__)
      """)
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr + out.stdout
  assert str(tmp_path) not in out.stdout and "tqdm" in out.stdout


def test_the_smoke_config_without_data_is_an_error_not_a_scan_of_the_current_folder(tmp_path, monkeypatch):
  from erasablemask_jax.data.faces import load_face_splits  # pylint: disable=import-outside-toplevel

  monkeypatch.chdir(tmp_path)
  (tmp_path / "holiday.png").write_bytes(b"not read")
  config = load_config("smoke")
  with pytest.raises(FileNotFoundError, match="no training data: data.manual_dir is empty.*bundled:sample_faces"):
    load_face_splits(config.data, config.fr, config.image_size)
