"""Resuming under a changed config: refused with the changed keys, unless safe and allowed; scripts can opt out."""

from __future__ import annotations

import json

import pytest

import tiny
from erasablemask_jax import cli
from erasablemask_jax.config import ConfigError, load_config
from erasablemask_jax.train import resume
from erasablemask_jax.train import trainer as trainer_lib


def _workdir(tmp_path, config, step=3, stages=None):
  """A workdir as the trainer leaves it: config.json and orbax step directories (contents not needed here)."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / str(step)).mkdir(parents=True)
  (workdir / "checkpoints" / f"{step + 1}.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save: not a step
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  if stages:
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "stage": float(st), "loss": 1.0}) + "\n"
                                                   for s, st in stages.items()) + '{"step": 9, "sta')
  return workdir


def _changed(**overrides):
  return tiny.set_fields(load_config("smoke"), **overrides)  # stages of 2, 2 and 2 steps


def test_unchanged_or_fresh_workdirs_pass(tmp_path):
  config = load_config("smoke")
  assert resume.check_resume_config(_workdir(tmp_path, config), load_config("smoke")) == {}
  assert resume.check_resume_config(tmp_path / "new", _changed(**{"model.gamma": 0.5})) == {}
  (tmp_path / "started").mkdir()  # config.json written, but no checkpoint yet: a fresh start, not a resume
  (tmp_path / "started" / "config.json").write_text(config.to_json_best_effort())
  assert resume.check_resume_config(tmp_path / "started", _changed(**{"model.gamma": 0.5})) == {}


def test_a_run_saved_with_the_legacy_attack_fields_resumes(tmp_path):
  """A config.json of a version with attack.first_order and attack.lr_inner = -1 ("the optimiser's lr")."""
  saved = json.loads(load_config("smoke").to_json_best_effort())
  saved["attack"].update(first_order=False, lr_inner=-1.0)
  workdir = _workdir(tmp_path, load_config("smoke"))
  (workdir / "config.json").write_text(json.dumps(saved))
  assert resume.check_resume_config(workdir, load_config("smoke")) == {}
  saved["attack"].update(first_order=True)
  (workdir / "config.json").write_text(json.dumps(saved))
  assert resume.check_resume_config(workdir, _changed(**{"attack.kind": "first_order"})) == {}
  with pytest.raises(resume.ConfigChangeError, match="attack.kind"):
    resume.check_resume_config(workdir, load_config("smoke"))


def test_a_damaged_config_json_is_a_clear_error(tmp_path):
  workdir = _workdir(tmp_path, load_config("smoke"))
  (workdir / "config.json").write_text('{"model": {"gamma": 0.0')
  with pytest.raises(resume.ConfigChangeError, match="config.json is not valid JSON"):
    resume.check_resume_config(workdir, load_config("smoke"))


@pytest.mark.parametrize("overrides, allowed", [
    ({"train.log_every_steps": 5, "train.checkpoint_every_steps": 4}, True),
    ({"mesh.data": 1}, True),
    ({"schedule.stage2_steps": 10}, True),  # step 3 is inside stage 2: it may grow
    ({"schedule.stage3_steps": 10, "schedule.stage3_epochs": 7}, True),
    ({"schedule.stage1_epochs": 9}, True),  # stage 1 is counted in steps: its epoch count is unused
    ({"schedule.stage1_steps": 10}, "stage 1 finished before the checkpoint at step 3"),
    ({"schedule.stage3_steps": 1}, "shortens stage 3"),
    ({"schedule.stage3_steps": -1}, "switches stage 3 between a step count and an epoch count"),
    ({"model.gamma": 0.5}, "the architecture"),
    ({"image_size": 64}, "the architecture"),
    ({"fr.surrogates": ("bundled:mobilefacenet",)}, "the architecture"),
    ({"attributes": ("Bald",)}, "the architecture"),
    ({"loss.l_adv": 1.0}, "changes what the remaining steps train"),
    ({"attack.kind": "ensemble", "train.log_every_steps": 5}, "attack.kind"),
])
def test_changes_are_refused_with_their_keys_unless_safe_and_allowed(tmp_path, overrides, allowed):
  workdir = _workdir(tmp_path, load_config("smoke"))
  config = _changed(**overrides)
  with pytest.raises(resume.ConfigChangeError) as e:
    resume.check_resume_config(workdir, config)
  message = str(e.value)
  assert isinstance(e.value, ConfigError) and "\n" not in message and f"{workdir} was trained to step 3" in message
  assert all(key in message for key in overrides)
  if allowed is True:
    assert "pass --allow-config-change" in message
    assert sorted(resume.check_resume_config(workdir, config, allow_changes=True)) == sorted(overrides)
  else:
    with pytest.raises(resume.ConfigChangeError, match=allowed):
      resume.check_resume_config(workdir, config, allow_changes=True)
  assert json.loads((workdir / "config.json").read_text()) == json.loads(load_config("smoke").to_json_best_effort())


@pytest.mark.parametrize("stage_at_step, allowed", [(1, True), (2, False), (None, False)])
def test_epoch_counted_stages_are_judged_from_the_logged_stage(tmp_path, stage_at_step, allowed):
  epochs = {"schedule.stage1_steps": -1, "schedule.stage2_steps": -1}
  stages = {1: 1, 3: stage_at_step} if stage_at_step else {1: 1}
  workdir = _workdir(tmp_path, _changed(**epochs), step=3, stages=stages)
  config = _changed(**epochs, **{"schedule.stage1_epochs": 300})
  if allowed:
    assert list(resume.check_resume_config(workdir, config, allow_changes=True)) == ["schedule.stage1_epochs"]
  else:
    reason = "stage 1 finished" if stage_at_step else "cannot tell whether stage 1 has finished"
    with pytest.raises(resume.ConfigChangeError, match=reason):
      resume.check_resume_config(workdir, config, allow_changes=True)


def test_cli_refuses_a_changed_config_with_one_line_and_status_2(tmp_path, capsys):
  workdir = _workdir(tmp_path, load_config("smoke"))
  argv = ["train", "--config", "smoke", "--workdir", str(workdir)]
  assert cli.main(argv + ["--config.model.gamma=0.5", "--allow-config-change"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("erasablemask train: config error: ")
  assert "model.gamma 0.05 -> 0.5 (the architecture" in err
  assert cli.main(argv + ["--config.train.log_every_steps=5"]) == 2
  assert "train.log_every_steps 1 -> 5; pass --allow-config-change" in capsys.readouterr().err


def test_train_and_evaluate_checks_unless_told_not_to(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path, load_config("smoke"))
  config = _changed(**{"attack.kind": "ensemble"})
  calls = []
  monkeypatch.setattr(trainer_lib, "Trainer", lambda *a, **k: calls.append(a) or type("T", (), {"run": lambda s: 7})())
  with pytest.raises(resume.ConfigChangeError, match="attack.kind"):
    trainer_lib.train_and_evaluate(config, workdir)
  assert not calls
  # A script continuing a copied stage-1 workdir with another attack opts out.
  assert trainer_lib.train_and_evaluate(config, workdir, check_config=False) == 7 and len(calls) == 1
  quieter = _changed(**{"train.log_every_steps": 5})
  assert trainer_lib.train_and_evaluate(quieter, workdir, allow_config_change=True) == 7 and len(calls) == 2
