"""Our aligner against the shared assets' recorded alignments: landmarks and MobileFaceNet verification AUC.

Detecting all 296 CelebA photos takes minutes on a 2-core CPU, so CelebA is tested on a deterministic subset of
identities (both sides of the AUC comparison on the same photos); deepface on all 25 photos.
`python -m benchmarks.alignment_accuracy` reports the full sets (and holds the AUC comparison).
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import alignment_accuracy
from erasablemask_jax.align import evaluate

pytestmark = pytest.mark.assets

# CelebA: the first N_IDENTITIES identities (sorted ids) x 4 photos, used for both the landmark and the AUC test.
N_IDENTITIES = 16
PER_IDENTITY = 4


@pytest.fixture(scope="module")
def celeba(assets_dir):
  from erasablemask_jax.fr import calibration
  folder = assets_dir / "images/celeba_wild_identities"
  identities = calibration.read_identities(folder / "identity_CelebA_subset.txt")
  stems = evaluate.subset_by_identity(identities, N_IDENTITIES, PER_IDENTITY)
  results = evaluate.detect_photos(folder, [f"{s}.jpg" for s in stems])
  meta = evaluate.read_meta(assets_dir / "images/derived_aligned112/celeba_wild_identities/alignment_meta.json")
  return identities, results, meta


def test_celeba_landmarks_within_3px(celeba):
  _, results, meta = celeba
  report = evaluate.landmark_errors(results, meta)
  assert not report["missing"], f"no face found in {report['missing']}; the assets record one in each"
  assert report["mean_px"] < 3.0, report


def test_deepface_landmarks_within_3px(assets_dir):
  meta = evaluate.read_meta(assets_dir / "images/derived_aligned112/deepface_pairs/alignment_meta.json")
  results = evaluate.detect_photos(assets_dir / "images/deepface_pairs", sorted(meta))  # all 25 photos
  assert sum(max(r.image_hw) > 1000 for r in results) >= 10  # the downscaled path is exercised
  report = evaluate.landmark_errors(results, meta)
  assert not report["missing"], f"no face found in {report['missing']}; the assets record one in each"
  assert report["mean_px"] < 3.0, report


def test_arcface_crops_give_mobilefacenet_the_reference_auc(celeba, assets_dir):
  """Same photos, same pairs: AUC of the real foamliu MobileFaceNet on our crops within 0.005 of the assets' crops."""
  from erasablemask_jax import fr
  identities, results, _ = celeba
  recogniser = fr.load_bundled("mobilefacenet")
  cmp = alignment_accuracy.compare_verification(recogniser, results,
                                      assets_dir / "images/derived_aligned112/celeba_wild_identities", identities)
  assert not cmp["left_out"]
  assert cmp["n_identities"] == N_IDENTITIES and cmp["n_genuine"] == N_IDENTITIES * 6
  assert cmp["auc_reference"] > 0.9  # the recogniser really separates these identities
  assert abs(cmp["auc_diff"]) < 0.005, cmp
  # The crops are not a copy of the reference crops, yet close to them (same template, similar landmarks).
  from PIL import Image
  ref = np.asarray(Image.open(assets_dir / "images/derived_aligned112/celeba_wild_identities"
                              / f"{results[0].name[:-4]}.png").convert("RGB"), np.float32)
  diff = np.abs(results[0].arcface_crop.astype(np.float32) - ref).mean()
  assert 0 < diff < 40, diff
