"""`fr.load` on a model folder that is not what its card says: one short message naming the file and what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from erasablemask_jax import convert
from erasablemask_jax import fr
from erasablemask_jax.fr import recogniser as recogniser_lib


def _copy_bundled(tmp_path, edit):
  model = tmp_path / "model"
  shutil.copytree(fr.bundled_dir(), model)
  card = json.loads((model / "card.json").read_text())
  edit(card)
  (model / "card.json").write_text(json.dumps(card))
  return model


@pytest.mark.parametrize("drop", ["input_size", "embedding_size", "preprocessing", "arch"])
def test_a_card_without_a_needed_field_is_named(tmp_path, drop):
  model = _copy_bundled(tmp_path, lambda card: card.pop(drop))
  with pytest.raises(convert.ModelDirError, match=rf"card\.json lacks {drop}: .*convert the checkpoint again"):
    fr.load(model)


def test_a_card_without_the_normalisation_is_named(tmp_path):
  model = _copy_bundled(tmp_path, lambda card: card["preprocessing"].pop("std"))
  with pytest.raises(convert.ModelDirError, match=r"lacks preprocessing\.std"):
    fr.load(model)


def test_variables_of_another_architecture_give_a_summary_not_every_key(tmp_path):
  model = _copy_bundled(tmp_path, lambda card: card.update(arch="mobileface_v2"))
  with pytest.raises(convert.StrictMergeError) as e:
    fr.load(model)
  message = str(e.value)
  assert f"{model}, card arch mobileface_v2" in message.splitlines()[0]
  assert len(message.splitlines()) <= 22, message  # counts, five keys of each kind, "... and N more", the advice
  assert "more" in message and message.splitlines()[-1].strip().endswith("convert the checkpoint again into a new folder.")
  assert len(e.value.missing) > 5 and len(e.value.unexpected) > 5  # the exception still holds every key


def test_an_unknown_bundled_name_reads_without_stray_quotes():
  with pytest.raises(KeyError) as e:  # still a KeyError for callers that probe names
    fr.bundled_dir("nope")
  assert isinstance(e.value, recogniser_lib.UnknownBundledModel)
  assert str(e.value) == "no bundled face-recognition model 'nope'; bundled: bundled:mobilefacenet"
