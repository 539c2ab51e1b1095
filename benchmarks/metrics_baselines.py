"""FGSM / PGD white-box impersonation on the bundled MobileFaceNet, and LPIPS / FID-Inception throughput.

Sources: one bundled sample face (MIT; 256x256) per identity, target: another identity (facenet_paul_rudd); the surrogate is the bundled foamliu
MobileFaceNet with its calibrated FAR 0.01 threshold (tau1). Throughput uses random weights (speed does not depend on
them). Prints a table and writes JSON. Usage: `python -m benchmarks.metrics_baselines [--n 8] [--steps 20]`
(default `benchmarks/results/metrics_baselines.json`).

`--lpips-only` measures just the `lpips_pretrained` section and merges it into the JSON, keeping the other sections as
they were measured: LPIPS v0.1 with the `metrics` extra's real weights (`metrics.lpips.default_lpips`) on a batch of 64
faces at 256x256 (the 28 bundled faces, their mirror images and 8 repeats) against the same faces plus Gaussian noise
(sigma 8/255, seed 0), timed after one compiled chunk, with the load average before and after (the figure is only as
quiet as the machine was); and FD-VGG16 between two disjoint halves of the 28 faces (14 vs 14), the floor that the
small-sample bias alone gives.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks import results as results_lib
from erasablemask_jax import fr
from erasablemask_jax.image_io import read_image
from erasablemask_jax.image_io import uint8_to_minus1_1
from erasablemask_jax.metrics import fid
from erasablemask_jax.metrics import lpips
from erasablemask_jax.metrics import recognition

SAMPLE = pathlib.Path(fr.__file__).resolve().parents[1] / "assets" / "sample_faces"


def _timed(fn, *args):
  jax.block_until_ready(fn(*args))  # compile
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def _random_variables(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32), abstract)


def lpips_pretrained(batch: int = 64, size: int = 256) -> dict:
  """The `lpips_pretrained` section (module docstring)."""
  files = sorted(SAMPLE.glob("*.png"))
  faces = uint8_to_minus1_1(np.stack([read_image(p) for p in files]))
  if faces.shape[1:3] != (size, size):
    raise SystemExit(f"the bundled faces are {faces.shape[2]}x{faces.shape[1]}, not {size}x{size}")
  a = np.concatenate([faces, faces[:, :, ::-1], faces])[:batch]
  b = np.clip(a + np.random.default_rng(0).normal(0, 8 / 127.5, a.shape), -1, 1).astype(np.float32)
  out = {"load_average_before": list(os.getloadavg()), "cpu_count": os.cpu_count(), "batch": batch, "size": size,
         "pairs": "bundled faces (+ mirrors) vs the same + N(0, 8/255) noise, seed 0", "nets": {}}
  for net in ("alex", "vgg"):
    t = time.perf_counter()
    lpips.pretrained_variables(net)
    load_s = time.perf_counter() - t
    metric = lpips.pretrained_metric(net)
    chunk = metric.batch_size
    t = time.perf_counter()
    lpips.default_lpips(a[:chunk], b[:chunk], net)  # compiles the chunk shape
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    d = lpips.default_lpips(a, b, net)
    secs = time.perf_counter() - t
    out["nets"][net] = {"weights_load_s": load_s, "first_chunk_s_incl_compile": compile_s, "chunk": chunk,
                        "seconds_for_batch": secs, "ms_per_pair": 1000 * secs / batch,
                        "pairs_per_s": batch / secs, "mean_lpips": float(d.mean())}
  extractor = fid.load_vgg16_features()
  t = time.perf_counter()
  out["fd_vgg16_split_half"] = {"label": fid.FD_VGG16_LABEL, "n_per_set": len(faces) // 2,
                                "value": fid.fd_vgg16(faces[0::2], faces[1::2], extractor),
                                "seconds": time.perf_counter() - t}
  out["load_average_after"] = list(os.getloadavg())
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=8, help="source faces")
  ap.add_argument("--steps", type=int, default=20, help="PGD steps")
  ap.add_argument("--out", default=results_lib.out_path("metrics_baselines.json"))
  ap.add_argument("--lpips-only", action="store_true", help="measure only `lpips_pretrained`; merge it into --out")
  ap.add_argument("--note", default="", help="recorded with `lpips_pretrained` (e.g. what else loads the machine)")
  args = ap.parse_args(argv)
  load_start = os.getloadavg()
  section = lpips_pretrained()
  section["note"] = args.note
  for net, r in section["nets"].items():
    print(f"LPIPS {net} (real weights), {section['batch']} pairs at {section['size']}: {r['seconds_for_batch']:.1f} s "
          f"({r['ms_per_pair']:.1f} ms/pair), mean LPIPS {r['mean_lpips']:.4f}")
  fd = section["fd_vgg16_split_half"]
  print(f"{fd['label']}, two disjoint halves of the bundled faces ({fd['n_per_set']} vs {fd['n_per_set']}): "
        f"{fd['value']:.2f}")
  print(f"load average before {section['load_average_before']}, after {section['load_average_after']}, "
        f"{section['cpu_count']} CPUs")
  if args.lpips_only:
    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["lpips_pretrained"] = section
    result.pop("machine", None), result.pop("command", None)  # this run's, written anew
    print(f"wrote {results_lib.write_report(out, 'metrics_baselines', argv, result, load_start)}")
    return 0

  with open(SAMPLE / "attributes.csv") as f:
    identity = {row.split(",")[0]: row.strip().split(",")[-1] for row in f.readlines()[1:]}
  target_file = SAMPLE / "facenet_paul_rudd.png"
  sources, seen = [], {identity[target_file.name]}
  for name in sorted(identity):  # one face per other identity: clean pairs are impostor pairs
    if identity[name] not in seen and len(sources) < args.n:
      seen.add(identity[name])
      sources.append(SAMPLE / name)
  load = lambda p: uint8_to_minus1_1(np.asarray(Image.open(p).convert("RGB")))
  x = jnp.asarray(np.stack([load(p) for p in sources]))
  x_target = jnp.asarray(load(target_file))[None]
  rec = fr.load_bundled()
  embed = jax.tree_util.Partial(rec.apply_fn, rec.variables)
  target = jax.jit(embed)(x_target)[0]
  tau1 = rec.threshold(0.01)
  rows = {}
  t = time.perf_counter()
  x_fgsm = recognition.fgsm(x, [embed], [target]).block_until_ready()
  t_fgsm = time.perf_counter() - t
  t = time.perf_counter()
  x_pgd = recognition.pgd(x, [embed], [target], num_steps=args.steps).block_until_ready()
  t_pgd = time.perf_counter() - t
  for name, images, secs in (("clean", x, 0.0), ("fgsm", x_fgsm, t_fgsm), (f"pgd{args.steps}", x_pgd, t_pgd)):
    cos = np.asarray(recognition.cosine(jax.jit(embed)(images), target))
    rows[name] = {"mean_cos": float(cos.mean()), "asr": recognition.attack_success_rate(cos, tau1),
                  "linf_0_1": float(jnp.max(jnp.abs(images - x)) / 2), "seconds_incl_compile": secs}

  size = 256
  xb = jnp.zeros((8, size, size, 3), jnp.float32)
  speed = {}
  for net in ("alex", "vgg"):
    module = lpips.LPIPS(net)
    v = _random_variables(jax.eval_shape(module.init, jax.random.key(0), xb[:1], xb[:1]))
    speed[f"lpips_{net}_ms_per_pair"] = 1000 * _timed(jax.jit(module.apply), v, xb, xb + 0.1) / 8
  module = fid.FIDInceptionV3()
  v = _random_variables(fid.abstract_variables())
  v["batch_stats"] = jax.tree_util.tree_map(jnp.abs, v["batch_stats"])
  speed["fid_inception_299_ms_per_image"] = 1000 * _timed(jax.jit(module.apply), v, xb) / 8

  print(f"surrogate {rec.name}, tau1 (FAR 0.01) = {tau1:.4f}, eps = 4/255 on [0,1], {len(sources)} sources, "
        f"target {target_file.name}")
  print(f"{'attack':10s} {'mean cos':>9s} {'ASR':>6s} {'Linf[0,1]':>10s} {'s (incl. compile)':>18s}")
  for name, r in rows.items():
    print(f"{name:10s} {r['mean_cos']:9.4f} {r['asr']:6.2f} {r['linf_0_1']:10.5f} {r['seconds_incl_compile']:18.1f}")
  for k, val in speed.items():
    print(f"{k:34s} {val:8.1f}")
  result = {"versions": {"jax": jax.__version__, "python": platform.python_version()},
            "settings": {"n_sources": len(sources), "pgd_steps": args.steps, "epsilon_0_1": 4 / 255,
                         "surrogate": rec.name, "tau1": tau1, "target": target_file.name, "throughput_batch": 8,
                         "throughput_size": size},
            "attacks": rows, "throughput": speed, "lpips_pretrained": section}
  print(f"wrote {results_lib.write_report(args.out, 'metrics_baselines', argv, result, load_start)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
