"""The one reader of a run directory: config.json (legacy spellings upgraded), checkpoints and metrics.jsonl."""

import json

import ml_collections
import pytest

from erasablemask_jax import run_dir


def test_config_round_trip_and_legacy_attack_spelling(tmp_path):
  config = ml_collections.ConfigDict({"optim": {"lr": 0.5}, "attack": {"kind": "meta_auxiliary", "first_order": True,
                                                                       "lr_inner": -1.0}})
  run_dir.write_config(tmp_path, config)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing left beside it
  read = run_dir.read_config(tmp_path)
  assert read.attack.kind == "first_order" and "first_order" not in read.attack and read.attack.lr_inner == 0.5
  assert run_dir.read_config_dict(tmp_path)["optim"] == {"lr": 0.5}


def test_a_folder_without_config_is_not_a_run(tmp_path):
  with pytest.raises(run_dir.NotARunError, match="is not a training run .*pass the --workdir used for training"):
    run_dir.read_config(tmp_path)
  assert run_dir.latest_checkpoint_step(tmp_path) is None and run_dir.read_metrics(tmp_path) == []


def test_latest_checkpoint_and_complete_metric_rows(tmp_path):
  for name in ("3", "12", "7.orbax-checkpoint-tmp-1", "notes"):
    (run_dir.checkpoints_dir(tmp_path) / name).mkdir(parents=True)
  assert run_dir.latest_checkpoint_step(tmp_path) == 12
  rows = [{"step": 1, "stage": 1, "g/rec": 0.5}, {"step": 2, "stage": 2}]
  run_dir.metrics_path(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "sta')
  assert run_dir.read_metrics(tmp_path) == rows  # the line a killed run cut short is not a row
