"""A small face folder held in memory: split by identity into training, held-out and target faces.

The target rule lives here and only here: a target spec is `identity:K` (identity K's faces of the folder, which are
then neither trained on nor evaluated), an image file, or a folder of images.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from erasablemask_jax import image_io
from erasablemask_jax.data.pipeline import load_face_folder_arrays

IDENTITY_PREFIX = "identity:"


@dataclasses.dataclass
class FaceSplits:
  """A small face folder split by identity: training faces, held-out evaluation faces and the target's faces."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  target: np.ndarray


def subset(arrays: dict, mask: np.ndarray) -> dict[str, np.ndarray]:
  """The rows of `{image, att, identity, file}` where `mask` (a boolean mask or an index array) selects."""
  index = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
  return {"image": arrays["image"][index], "att": arrays["att"][index], "identity": arrays["identity"][index],
          "file": [arrays["file"][i] for i in index]}


def target_faces(target: str, arrays: dict, image_size: int, folder: str) -> tuple[np.ndarray, np.ndarray]:
  """`(target images uint8 (M, S, S, 3), mask of the folder's faces that are the target)` for a target spec.

  `identity:K` takes identity K's faces of `arrays` (read from `folder`); an image file or a folder is read and masks
  nothing; an empty spec gives no target images.

  Raises:
    ValueError: no face of identity K in the folder.
    FileNotFoundError: the image file or folder does not exist or holds no image.
  """
  mask = np.zeros(len(arrays["identity"]), bool)
  if target.startswith(IDENTITY_PREFIX):
    target_id = int(target.removeprefix(IDENTITY_PREFIX))
    mask = arrays["identity"] == target_id
    if not mask.any():
      raise ValueError(f"target {target!r}: no face of identity {target_id} in {folder}; pass an image, a folder "
                       "or another identity")
    return arrays["image"][mask], mask
  if target:
    return read_faces(target, image_size), mask
  return np.zeros((0, image_size, image_size, 3), np.uint8), mask


def load_face_splits(data_config, fr_config, image_size: int) -> FaceSplits:
  """Reads `data.manual_dir` into memory and splits it: `fr.target` names the target (`target_faces`; an identity's
  faces are never trained on or evaluated); `data.eval_identities` are held out for evaluation; the rest trains."""
  arrays = load_face_folder_arrays(data_config.manual_dir, image_size)
  target, target_mask = target_faces(fr_config.target, arrays, image_size, data_config.manual_dir)
  eval_mask = np.isin(arrays["identity"], np.asarray(data_config.eval_identities, np.int32)) & ~target_mask
  train_mask = ~eval_mask & ~target_mask
  return FaceSplits(train=subset(arrays, train_mask), eval=subset(arrays, eval_mask), target=target)


def read_faces(path: str, image_size: int) -> np.ndarray:
  """uint8 `(N, S, S, 3)` from an image file or a folder of them (centre-cropped and resized)."""
  p = pathlib.Path(path)
  files = image_io.list_images(p) if p.is_dir() else [p]
  if not files or not all(f.is_file() for f in files):
    raise FileNotFoundError(f"no face image at {path}; a target is an image file, a folder, or 'identity:K'")
  return np.stack([image_io.square_resize(image_io.read_image(f, str(f)), image_size) for f in files])
