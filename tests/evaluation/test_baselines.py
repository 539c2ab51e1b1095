"""Table II's FGSM / PGD baselines reach high white-box ASR on the real bundled MobileFaceNet (112x112 faces)."""

import numpy as np

from erasablemask_jax import fr
from erasablemask_jax.data.pipeline import load_face_folder_arrays
from erasablemask_jax.evaluation import report as report_lib
from erasablemask_jax.metrics import recognition
from erasablemask_jax.fr.surrogates import load_surrogate

SIZE = 112


def test_pgd_and_fgsm_impersonate_the_target_on_mobilefacenet():
  arrays = load_face_folder_arrays("bundled:sample_faces", SIZE)
  ident = arrays["identity"]
  # One face of each of four identities other than the target (identity 0).
  index = [int(np.flatnonzero(ident == i)[0]) for i in (1, 2, 3, 4)]
  x = arrays["image"][index].astype(np.float32) / 127.5 - 1.0
  x_t = arrays["image"][ident == 0].astype(np.float32) / 127.5 - 1.0
  surrogate = load_surrogate("bundled:mobilefacenet", "loose_to_arcface", SIZE)
  tau1 = fr.load_bundled().threshold(0.01)

  out = report_lib.attack_baselines(x, x_t, [surrogate], pgd_steps=10)
  t = np.asarray(surrogate.embed(x_t)).mean(axis=0)

  def cos(images):
    return np.asarray(surrogate.embed(images)) @ t

  for name in ("fgsm", "pgd"):
    assert np.abs(out[name] - x).max() <= recognition.EPSILON + 1e-6, name  # 4/255 on [0, 1]
  clean, fgsm, pgd = cos(x), cos(out["fgsm"]), cos(out["pgd"])
  assert np.mean(clean > tau1) == 0.0  # other people: not accepted as the target before the attack
  assert np.mean(fgsm) > np.mean(clean) + 0.1
  assert np.mean(pgd > tau1) >= 0.75, (clean, fgsm, pgd, tau1)  # white-box PGD crosses the calibrated tau1
  assert np.all(pgd > fgsm - 0.05)
