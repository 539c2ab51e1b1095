"""The 13 attributes and the label files they are read from.

`attributes.csv` (face_folder, ffhq and the bundled sample) has a header row with a `file` column (a path relative to
the image folder), the 13 attribute columns below as 0/1 (-1 is read as 0, CelebA's convention), and optionally an
`identity` column (integer; empty or absent means unknown, stored as -1). Extra columns are ignored.

CelebAMask-HQ's `CelebAMask-HQ-attribute-anno.txt`: line 1 the image count, line 2 the 40 attribute names, then one
line per image `<idx>.jpg v1 ... v40` with values +1/-1.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np

ATTRIBUTES = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Male",
              "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young")
NUM_ATTRIBUTES = len(ATTRIBUTES)


class LabelFileError(ValueError):
  """A label file is missing or malformed; the message names the file and what to fix."""


def _to01(value: str, where: str) -> float:
  v = value.strip()
  if v in ("1", "+1", "1.0"):
    return 1.0
  if v in ("0", "-1", "0.0", "-1.0"):
    return 0.0
  raise LabelFileError(f"{where}: attribute value {value!r} is not 0/1 (or -1/+1)")


def read_attribute_csv(path: str | pathlib.Path, require_attributes: bool = True) -> dict[str, tuple[np.ndarray, int]]:
  """Reads an `attributes.csv`.

  Args:
    path: the CSV.
    require_attributes: when False, a CSV with only `file` and `identity` is accepted (attributes become zeros).

  Returns:
    `{file: (att float32 (13,) 0/1, identity int or -1)}`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise LabelFileError(f"attribute file {path} not found; create it with a `file` column and the columns "
                         f"{', '.join(ATTRIBUTES)} (0/1), optionally `identity`")
  with path.open(newline="") as f:
    reader = csv.DictReader(f)
    cols = reader.fieldnames or []
    if "file" not in cols:
      raise LabelFileError(f"{path}: no `file` column in the header {cols}")
    missing = [a for a in ATTRIBUTES if a not in cols]
    if missing and (require_attributes or len(missing) < NUM_ATTRIBUTES):
      raise LabelFileError(f"{path}: missing attribute columns {missing}")
    out = {}
    for line, row in enumerate(reader, start=2):
      where = f"{path}:{line}"
      att = np.zeros(NUM_ATTRIBUTES, np.float32)
      if not missing:
        att = np.array([_to01(row[a], where) for a in ATTRIBUTES], np.float32)
      ident = (row.get("identity") or "").strip()
      try:
        identity = int(ident) if ident else -1
      except ValueError as e:
        raise LabelFileError(f"{where}: identity {ident!r} is not an integer") from e
      name = row["file"].strip()
      if name in out:
        raise LabelFileError(f"{where}: file {name!r} listed twice")
      out[name] = (att, identity)
  return out


def read_split_column(csv_path: str | pathlib.Path) -> dict[str, str]:
  """`{file: "train" | "validation" | "test"}` from the optional `split` column of an `attributes.csv` (empty: train;
  no column: `{}`)."""
  csv_path = pathlib.Path(csv_path)
  with csv_path.open(newline="") as f:
    reader = csv.DictReader(f)
    if "split" not in (reader.fieldnames or []):
      return {}
    out = {}
    for row in reader:
      split = row["split"].strip() or "train"
      if split not in ("train", "validation", "test"):
        raise LabelFileError(f"{csv_path}: split {split!r} for {row['file']} is not train/validation/test")
      out[row["file"].strip()] = split
  return out


def write_attribute_csv(path: str | pathlib.Path, rows: dict[str, tuple[np.ndarray, int]]) -> None:
  """Writes `{file: (att, identity)}` in the `attributes.csv` format (sorted by file)."""
  with pathlib.Path(path).open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", *ATTRIBUTES, "identity"])
    for name in sorted(rows):
      att, identity = rows[name]
      w.writerow([name, *[int(round(float(a))) for a in att], int(identity)])


def read_celebamask_hq_annotations(path: str | pathlib.Path) -> dict[int, np.ndarray]:
  """Reads `CelebAMask-HQ-attribute-anno.txt` into `{image index: att float32 (13,) 0/1}` (our 13, in order)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise LabelFileError(f"CelebA-HQ annotation file {path} not found; put CelebAMask-HQ's "
                         "`CelebAMask-HQ-attribute-anno.txt` in the manual directory")
  lines = path.read_text().splitlines()
  if len(lines) < 2:
    raise LabelFileError(f"{path}: expected a count line and a header line")
  names = lines[1].split()
  missing = [a for a in ATTRIBUTES if a not in names]
  if missing:
    raise LabelFileError(f"{path}: header lacks attributes {missing}")
  cols = [names.index(a) for a in ATTRIBUTES]
  out = {}
  for n, line in enumerate(lines[2:], start=3):
    parts = line.split()
    if not parts:
      continue
    if len(parts) != len(names) + 1:
      raise LabelFileError(f"{path}:{n}: expected a file name and {len(names)} values, got {len(parts) - 1}")
    idx = int(pathlib.Path(parts[0]).stem)
    out[idx] = np.array([_to01(parts[1 + c], f"{path}:{n}") for c in cols], np.float32)
  return out
