"""End-to-end conversion of one PyTorch checkpoint into a model directory."""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
from typing import Any

from erasablemask_jax.convert import merge
from erasablemask_jax.convert import model_dir as model_dir_lib
from erasablemask_jax.convert import registry
from erasablemask_jax.convert import state_dict as state_dict_lib

CONVERTER_VERSION = "1"


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def convert_state_dict(arch: str, state: dict[str, Any], context: str = "") -> dict[str, Any]:
  """Torch state dict -> Flax variables of `arch` (rename, re-layout, then `strict_merge` against `eval_shape`)."""
  spec = registry.get_arch(arch)
  flat = spec.rename(state)
  abstract = merge.abstract_init(spec.build(), spec.input_shape)
  return merge.strict_merge(flat, abstract, context=context or f"arch {arch}")


def convert_checkpoint(arch: str, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       force: bool = False) -> pathlib.Path:
  """Converts `checkpoint` as architecture `arch` into `out_dir` (orbax variables + `card.json`).

  Every check (architecture known, output free, file readable and safe, strict match) happens before anything is
  written, so a failure leaves the file system as it was.

  Args:
    arch: a registered architecture name (`registry.list_archs()`).
    checkpoint: `.pth`/`.pt`/`.ckpt` (read with `torch.load(weights_only=True)`) or `.safetensors`.
    out_dir: destination directory.
    force: replace an existing `out_dir`.

  Returns:
    The written directory.
  """
  spec = registry.get_arch(arch)
  model_dir_lib.check_writable(out_dir, force)
  checkpoint = pathlib.Path(checkpoint)
  state = state_dict_lib.read_state_dict(checkpoint)
  variables = convert_state_dict(arch, state, context=f"--arch {arch}, checkpoint {checkpoint.name}")
  card = dict(spec.card)
  card.update({
      "arch": arch,
      "source": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)},
      "converter_version": CONVERTER_VERSION,
      "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  })
  card.setdefault("thresholds", {})
  return model_dir_lib.write_model_dir(out_dir, variables, card, force=force)
