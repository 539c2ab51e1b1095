"""`protect_folder` and `erase_folder`: the library behind `erasablemask protect` and `erasablemask erase`.

Protect: every image under the input folder (recursive) is read (`image_io.read_image`: odd formats converted,
unreadable or tiny files skipped with the reason), centre-cropped and resized to the run's resolution, protected in
jitted batches, `x_adv = G(x, att_b; E_adv)`, and written as `OUT/<relative path>.png` with its sidecar
`OUT/<relative path>.json`. Erase: every protected PNG is restored, `x_rec = R(x_adv, att_a)`, with `att_a` from its
sidecar (or `--source-attrs`), and written as `OUT/<relative path>.png`.

Existing outputs are never overwritten without `force` (the whole command refuses before writing anything), and
every file is written to a temporary name and renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import numpy as np

from erasablemask_jax import image_io
from erasablemask_jax.data import labels as labels_lib
from erasablemask_jax.image_io import to_uint8
from erasablemask_jax.inference import attributes as attributes_lib
from erasablemask_jax.inference import sidecar as sidecar_lib
from erasablemask_jax.inference.run import Run
from erasablemask_jax.inference.run import to_model_input

log = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
  """An output file exists and `force` was not given."""


@dataclasses.dataclass
class FolderResult:
  """What a protect / erase run did: written outputs (relative paths) and skipped inputs with their reasons."""

  written: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: dict[str, str] = dataclasses.field(default_factory=dict)  # written, with something to say (photos)

  def summary(self) -> str:
    text = f"{len(self.written)} written, {len(self.skipped)} skipped"
    if self.skipped:
      text += ":\n" + "\n".join(f"  {name}: {reason}" for name, reason in sorted(self.skipped.items()))
    if self.notes:
      text += "\n" + "\n".join(f"  {name}: {note}" for name, note in sorted(self.notes.items()))
    return text


def _progress(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _check_outputs(paths: list[pathlib.Path], force: bool) -> None:
  existing = [p for p in paths if p.exists()]
  if existing and not force:
    shown = ", ".join(str(p) for p in existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
    raise OutputExistsError(f"{len(existing)} output file(s) exist ({shown}); pass --force to overwrite them or "
                            "choose another --out")


def _unique_outputs(folder: pathlib.Path, suffix: str, result: FolderResult):
  """Yields (path, rel, stem) for the images under `folder` whose output name `stem + suffix` is free; an image whose
  stem an earlier one took (`a.jpg` after `a.png`) goes to `result.skipped`. The caller claims a stem by using it."""
  claimed: dict[str, str] = {}
  for path in image_io.list_images(folder):
    rel = str(path.relative_to(folder))
    stem = str(pathlib.Path(rel).with_suffix(""))
    if stem in claimed:
      result.skipped[rel] = f"its output name {stem}{suffix} is already taken by {claimed[stem]}; rename it"
      continue
    claimed[stem] = rel
    yield path, rel, stem


def attribute_rows(folder: pathlib.Path) -> dict[str, Any]:
  """`folder/attributes.csv` as `labels.read_attribute_csv` reads it; {} where there is none."""
  csv_path = folder / "attributes.csv"
  return labels_lib.read_attribute_csv(csv_path) if csv_path.is_file() else {}


def _read_inputs(folder: pathlib.Path, image_size: int, result: FolderResult, suffix_out: tuple[str, ...]
                 ) -> list[dict[str, Any]]:
  """Readable images of `folder` as dicts {rel, image uint8 (S, S, 3), source_size}; the rest go to `skipped`."""
  items = []
  for path, rel, stem in _unique_outputs(folder, suffix_out[0], result):
    try:
      image = image_io.read_image(path, rel)
    except image_io.SkipImage as e:
      result.skipped[rel] = str(e)
      log.warning("skipping %s: %s", rel, e)
      continue
    items.append({"rel": rel, "stem": stem, "source_size": image.shape[:2],
                  "image": image_io.square_resize(image, image_size)})
  return items


def source_attributes(folder: pathlib.Path, items: list[dict[str, Any]], run: Run) -> tuple[np.ndarray, list[str]]:
  """att_a (N, 13) for `items`: from `folder/attributes.csv` where it lists the file, else D_att's prediction."""
  rows = attribute_rows(folder)
  att_a = np.zeros((len(items), labels_lib.NUM_ATTRIBUTES), np.float32)
  sources = []
  missing = [i for i, item in enumerate(items) if item["rel"] not in rows]
  for i, item in enumerate(items):
    if item["rel"] in rows:
      att_a[i] = rows[item["rel"]][0]
      sources.append("attributes.csv")
    else:
      sources.append("d_att")
  if missing:
    x = to_model_input(np.stack([items[i]["image"] for i in missing]))
    att_a[missing] = attributes_lib.predicted(run.attribute_logits(x))
  return att_a, sources


def protect_folder(run: Run, in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   attrs: str = attributes_lib.DEFAULT_PROTECT_SPEC, force: bool = False,
                   progress: bool = True) -> FolderResult:
  """Protects every readable image under `in_dir` into `out_dir` (PNG + JSON sidecar each).

  Args:
    run: the loaded run (`inference.load_run`).
    in_dir: input folder (recursive), optionally with an `attributes.csv`.
    out_dir: output folder (created).
    attrs: how att_b is chosen (`attributes` module docstring).
    force: overwrite existing outputs.
    progress: show a tqdm bar.

  Returns:
    The written outputs and skipped inputs.

  Raises:
    FileNotFoundError: `in_dir` is not a folder.
    OutputExistsError: an output exists and `force` is False (nothing is written).
    AttributeSpecError: `attrs` is malformed.
  """
  in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
  if not in_dir.is_dir():
    raise FileNotFoundError(f"--in {in_dir} is not a folder of images")
  spec = attributes_lib.parse_spec(attrs)
  result = FolderResult()
  items = _read_inputs(in_dir, run.image_size, result, (".png", ".json"))
  if not items:
    return result
  outputs = [(out_dir / f"{it['stem']}.png", out_dir / f"{it['stem']}.json") for it in items]
  _check_outputs([p for pair in outputs for p in pair], force)
  att_a, att_a_sources = source_attributes(in_dir, items, run)
  att_b = spec.apply(att_a)
  config = run.config
  with _progress(len(items), "protect", progress) as bar:  # closed before any error is printed
    for start in range(0, len(items), run.batch_size):
      chunk = slice(start, start + run.batch_size)
      x = to_model_input(np.stack([it["image"] for it in items[chunk]]))
      x_adv, _ = run.protect(x, att_b[chunk])
      for j, image in enumerate(to_uint8(x_adv)):
        i = start + j
        png, js = outputs[i]
        sidecar_lib.write_png_atomic(png, image)
        sidecar_lib.write_json_atomic(js, sidecar_lib.make_sidecar(
            source=items[i]["rel"], source_size=items[i]["source_size"], image_size=run.image_size, att_a=att_a[i],
            att_a_source=att_a_sources[i], att_b=att_b[i], attrs_spec=spec.to_json(),
            flipped=attributes_lib.flipped_names(att_a[i], att_b[i]), checkpoint=run.checkpoint_info(),
            target=str(config.fr.target), surrogates=list(config.fr.surrogates)))
        result.written.append(str(png.relative_to(out_dir)))
        bar.update(1)
  return result


def _source_attrs_override(value: str):
  """`--source-attrs`: bits for every face, a CSV keyed by protected file, or `predicted[:NAME,...]`."""
  if value.startswith("predicted"):
    _, _, names = value.partition(":")
    flipped = [n.strip() for n in names.split(",") if n.strip()]
    for n in flipped:
      attributes_lib.invert(np.zeros(labels_lib.NUM_ATTRIBUTES), [n])  # validates the name
    return ("predicted", flipped if names else None)
  path = pathlib.Path(value)
  if path.suffix.lower() == ".csv":
    if not path.is_file():
      raise FileNotFoundError(f"--source-attrs {value}: no such CSV (columns `file` and the 13 attributes)")
    return ("csv", labels_lib.read_attribute_csv(path))
  bits = value.removeprefix("bits:")
  return ("bits", attributes_lib.parse_bits(bits, value))


def erase_folder(run: Run, in_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 source_attrs: str | None = None, force: bool = False, progress: bool = True) -> FolderResult:
  """Restores every protected PNG under `in_dir` into `out_dir`: `x_rec = R(x_adv, att_a)`.

  `att_a` per image: its sidecar's `att_a`; or, with `source_attrs`,
    - `bits:B1..B13` (or just the 13 digits): the same source attributes for every image;
    - a `.csv` path (`attributes.csv` format, `file` = the protected image's relative path): per image;
    - `predicted[:NAME,...]`: the documented approximation `att_a ~ invert(D_att(x_adv) > 0, flipped)`, where the
      flipped names come after the colon, or else from the sidecar's `flipped` list when there is one (D_att sees
      the protected face, which shows att_b; inverting the attributes protect flipped recovers att_a where D_att is
      right).
  Images without a sidecar (and no `source_attrs`) are skipped with the reason. A sidecar whose checkpoint
  fingerprint differs from this run's is used, with a warning (R of another run restores poorly).

  Raises:
    FileNotFoundError: `in_dir` is not a folder.
    OutputExistsError: an output exists and `force` is False (nothing is written).
  """
  in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
  if not in_dir.is_dir():
    raise FileNotFoundError(f"--in {in_dir} is not a folder of protected images")
  override = _source_attrs_override(source_attrs) if source_attrs else None
  result = FolderResult()
  items = []
  for path in sorted(in_dir.rglob("*.png")):
    if path.name.startswith("."):
      continue
    rel = str(path.relative_to(in_dir))
    side = None
    try:
      side = sidecar_lib.read_sidecar(sidecar_lib.sidecar_path(path))
    except sidecar_lib.SidecarError as e:
      if override is None or sidecar_lib.sidecar_path(path).exists():
        result.skipped[rel] = str(e)
        continue
    if side is not None and side["checkpoint"].get("params_sha256") != run.fingerprint:
      log.warning("%s was protected by another checkpoint (%s) than this run's (%s)", rel,
                  side["checkpoint"].get("params_sha256", "?")[:12], run.fingerprint[:12])
    if override is not None and override[0] == "csv" and rel not in override[1]:
      result.skipped[rel] = f"not listed in --source-attrs {source_attrs}"
      continue
    try:
      image = image_io.read_image(path, rel)
    except image_io.SkipImage as e:
      result.skipped[rel] = str(e)
      continue
    if image.shape[:2] != (run.image_size, run.image_size):
      result.skipped[rel] = (f"{image.shape[1]}x{image.shape[0]} is not this run's {run.image_size}x{run.image_size}"
                             " protected output; erase the PNGs that protect wrote")
      continue
    items.append({"rel": rel, "image": image, "sidecar": side})
  if not items:
    return result
  outputs = [out_dir / it["rel"] for it in items]
  _check_outputs(outputs, force)
  x_adv = to_model_input(np.stack([it["image"] for it in items]))
  att_a = np.zeros((len(items), labels_lib.NUM_ATTRIBUTES), np.float32)
  if override is not None and override[0] == "predicted":
    guess = attributes_lib.predicted(run.attribute_logits(x_adv))
    for i, it in enumerate(items):
      flipped = override[1] if override[1] is not None else (it["sidecar"] or {}).get("flipped", [])
      att_a[i] = attributes_lib.invert(guess[i], flipped)
  else:
    for i, it in enumerate(items):
      if override is None:
        att_a[i] = it["sidecar"]["att_a"]
      elif override[0] == "bits":
        att_a[i] = override[1]
      else:
        att_a[i] = override[1][it["rel"]][0]
  with _progress(len(items), "erase", progress) as bar:
    for start in range(0, len(items), run.batch_size):
      chunk = slice(start, start + run.batch_size)
      x_rec = to_uint8(run.restore(x_adv[chunk], att_a[chunk]))
      for j, image in enumerate(x_rec):
        sidecar_lib.write_png_atomic(outputs[start + j], image)
        result.written.append(items[start + j]["rel"])
        bar.update(1)
  return result
