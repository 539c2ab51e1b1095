"""Differentiable JPEG: throughput (ours vs kornia, one run) and fidelity against libjpeg (Pillow).

Throughput: images/s at 256x256, batch 32, quality 50, forward and forward+backward (gradient of sum(out^2)), for
`erasablemask_jax.noise.jpeg` with rounding "ste" (libjpeg-exact forward) and "cubic", and for
`kornia.enhance.jpeg_codec_differentiable` (Reich et al. 2024) with torch on the same CPU threads, when installed.

DCT form. libjpeg's islow DCT is two linear passes with a rounding shift after each, so the exact ("ste") path
applies an integer 8x8 matrix along one block axis at a time, on blocks kept in the reshape-only layout
(N, H/8, 8, W/8, 8). The "DCT forms" rows time the same separable forward+inverse DCT over a batch's blocks written
three ways: (a) `einsum`/`tensordot` with the 8x8 matrix (a dot_general; XLA adds transposes, and int32 dots have no
BLAS path on CPU), (b) a broadcast multiply + sum over k, (c) the products written out as slices, scaled adds and a
concatenate. Chosen (`jpeg_codec._apply_along`): (b) for int32, the fastest here (and a single fused loop on
GPU/TPU, where int32 matmuls have no fast units either); (a) for float32 in the "cubic" path, because its transpose
under `grad` is again a dot (3x faster backward than (b) in our measurement), while the forward is on par. The "ste"
backward runs no DCT at all: with straight-through rounding the DCT, quantiser and inverse DCT compose to the
identity, so the gradient is the colour transform and the chroma resampling only.

Fidelity (when ../shared/assets is present): mean PSNR against Pillow's decode over 48 aligned faces at QF 10, 25, 50,
75, 90, and the bias: PSNR(codec, original) - PSNR(libjpeg, original).

Timing: every codec (ours "ste" and "cubic", kornia eager and under `torch.compile`) is timed once per round, in a
rotated order, over `--rounds` interleaved rounds (best of `--reps` calls in a round; the median over rounds is
reported, every round kept in the JSON); torch gets all cores (`--threads`), as XLA does. Each codec's gradient is
named in `GRADIENTS` (and the JSON): they are not the same gradient, so fwd+bwd rates compare costs, not methods.

Usage: `python -m benchmarks.jpeg_throughput [--batch 32] [--size 256] [--rounds 5] [--reps 3] [--out FILE.json]`
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks import results
from benchmarks import timing
from erasablemask_jax import noise
from erasablemask_jax.noise import jpeg_codec

ASSETS = pathlib.Path(os.environ.get("ERASABLEMASK_ASSETS", pathlib.Path(__file__).resolve().parents[2] / "shared"
                                     / "assets"))
QUALITIES = (10, 25, 50, 75, 90)


# What each codec's gradient is (the rows time the forward and forward + backward of the same codecs).
GRADIENTS = {
    "ours_ste": "straight-through rounding: libjpeg's integer forward (bit-exact), d round(x)/dx := 1, so DCT, "
                "quantiser and inverse DCT pass the gradient as the identity (colour transform and chroma resampling "
                "only)",
    "ours_cubic": "cubic rounding round(x) + (x - round(x))^3 of the quantised coefficients, float32 orthonormal DCT: "
                  "d/dx = 3 (x - round(x))^2 (Shin & Song 2017)",
    "kornia": "kornia.enhance.jpeg_codec_differentiable (Reich et al. 2024): the same cubic polynomial rounding, "
              "float32 DCT, differentiable clipping",
}


def _best_rate(fn, reps: int, batch: int) -> float:
  """Images per second of fn() (already compiled and warmed): best of `reps` timed calls."""
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return batch / best


def _rate(fn, reps: int, batch: int) -> float:
  """Images per second of fn() (already compiled), best of `reps` timed runs after one warm-up call."""
  fn()
  return _best_rate(fn, reps, batch)


def _ours(x: jax.Array, quality: float) -> dict[str, Callable[[], Any]]:
  """`{name: fn}` of our codec's forward and forward + backward, per rounding, compiled."""
  out = {}
  for rounding in ("ste", "cubic"):
    fwd = jax.jit(lambda x, r=rounding: noise.jpeg(x, quality, rounding=r))
    # A loss that needs the forward values (a plain sum would let XLA drop the forward of the "ste" path).
    bwd = jax.jit(jax.grad(lambda x, r=rounding: jnp.sum(noise.jpeg(x, quality, rounding=r) ** 2)))
    out[f"ours_{rounding}_fwd"] = lambda f=fwd: jax.block_until_ready(f(x))
    out[f"ours_{rounding}_fwd_bwd"] = lambda f=bwd: jax.block_until_ready(f(x))
  return out


def _kornia(x: np.ndarray, quality: float, threads: int, compiled: bool) -> tuple[dict[str, Callable[[], Any]], dict]:
  """`({name: fn}, info)` for kornia's differentiable JPEG, eager and (with `compiled`) under `torch.compile`; info
  holds versions, the torch thread count and why a form is missing."""
  try:
    import kornia  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {}, {"kornia_missing": str(e)}
  torch.set_num_threads(threads)
  # NCHW and contiguous (a transposed view made torch.compile's backward fail a stride check in replication_pad2d).
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) * 0.5 + 0.5)).contiguous()
  q = torch.full((x.shape[0],), float(quality))
  info = {"kornia_version": kornia.__version__, "torch_version": torch.__version__,
          "torch_threads": torch.get_num_threads()}
  forms = {"kornia": kornia.enhance.jpeg_codec_differentiable}
  if compiled:
    forms["kornia_compiled"] = torch.compile(kornia.enhance.jpeg_codec_differentiable, dynamic=False)
  out = {}
  for name, codec in forms.items():
    def fwd(codec=codec):
      with torch.no_grad():
        codec(xt, q)

    def fwd_bwd(codec=codec):
      xr = xt.clone().requires_grad_(True)
      (codec(xr, q) ** 2).sum().backward()

    for key, fn in ((f"{name}_fwd", fwd), (f"{name}_fwd_bwd", fwd_bwd)):
      try:
        t = time.perf_counter()
        fn()
        info[f"{key}_first_call_s"] = time.perf_counter() - t  # torch.compile's compile time is in here
      except Exception as e:  # pylint: disable=broad-except  (a compiler failure is a finding to report, not a crash)
        info[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        continue
      out[key] = fn
  return out, info


def interleaved(fns: dict[str, Callable[[], Any]], batch: int, rounds: int, reps: int) -> dict[str, list[float]]:
  """Images/s of every fn in each of `rounds` rounds (best of `reps` calls per round), all fns timed in every round
  in an order rotated by one per round, so that a slow patch of the machine hits them alike."""
  for fn in fns.values():
    fn()  # warm
  return {n: [batch / t for t in v] for n, v in timing.rotated_rounds(fns, rounds, reps, best=True).items()}


def _written_out(x: jax.Array, m: np.ndarray, axis: int) -> jax.Array:
  """The 8x8 product along `axis` as slices, scaled adds and a concatenate (form (c))."""
  xs = [jax.lax.slice_in_dim(x, k, k + 1, axis=axis) for k in range(8)]
  outs = []
  for j in range(8):
    terms = [xs[k] * jnp.asarray(m[j, k], x.dtype) for k in range(8) if m[j, k] != 0]
    outs.append(sum(terms[1:], terms[0]))
  return jnp.concatenate(outs, axis=axis)


def _dct_forms(x: jax.Array, reps: int) -> dict[str, float]:
  """Images/s of a forward + inverse separable DCT over one batch's blocks (Y and chroma), per form and dtype."""
  n, h, w, _ = x.shape
  shape = (n, 3 * h // 16, 8, w // 8, 8)  # the merged Y + [Cb | Cr] plane of one image, in blocks
  ints = jax.random.randint(jax.random.PRNGKey(0), shape, -128, 128)
  forms = {
      "written_out": _written_out,
      "einsum": lambda b, m, a: jnp.moveaxis(jnp.tensordot(jnp.asarray(m, b.dtype), b, axes=((1,), (a,)),
                                                           preferred_element_type=b.dtype), 0, a),
      "broadcast_sum": lambda b, m, a: jnp.sum(
          jnp.expand_dims(b, a) * jnp.asarray(m, b.dtype).reshape((8, 8) + (1,) * (4 - a)), axis=a + 1),
  }
  out = {}
  for name, apply in forms.items():
    for dtype, m_f, m_i, blocks in (("int32", jpeg_codec._FDCT_M, jpeg_codec._IDCT_M, ints),
                                    ("float32", jpeg_codec._DCT_F32, jpeg_codec._DCT_F32.T,
                                     ints.astype(jnp.float32))):
      fn = jax.jit(lambda b, f=m_f, i=m_i, ap=apply: ap(ap(ap(ap(b, f, 4), f, 2), i, 2), i, 4))
      out[f"dct_{name}_{dtype}"] = _rate(lambda: jax.block_until_ready(fn(blocks)), reps, n)
  return out


def _pillow(pixels: np.ndarray, quality: int) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over images of the PSNR on 0..255 (an identical image counts as 100 dB so that the mean stays finite)."""
  mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
  return float(np.mean(np.where(mse == 0, 100.0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))))


def _fidelity() -> dict | None:
  files = sorted((ASSETS / "images" / "derived_aligned112").glob("*/*.png"))[:48]
  if len(files) < 48:
    return None
  pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  x = jnp.asarray(pixels, jnp.float32) / 127.5 - 1.0
  try:
    import kornia  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    kornia = None
  table = {}
  for q in QUALITIES:
    ref = np.stack([_pillow(p, q) for p in pixels])
    row = {"libjpeg_vs_original": _psnr(ref, pixels)}
    codecs = {r: np.asarray((noise.jpeg(x, q, rounding=r) + 1.0) * 127.5) for r in ("ste", "cubic")}
    codecs["ste"] = np.round(codecs["ste"])
    if kornia is not None:
      xt = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
      with torch.no_grad():
        k = kornia.enhance.jpeg_codec_differentiable(xt, torch.full((len(pixels),), float(q)))
      codecs["kornia"] = k.numpy().transpose(0, 2, 3, 1) * 255.0
    for name, out in codecs.items():
      row[f"{name}_vs_libjpeg"] = _psnr(out, ref)
      row[f"{name}_bias"] = _psnr(out, pixels) - row["libjpeg_vs_original"]
      row[f"{name}_exact_pixels"] = float(np.mean(np.round(out) == ref))
    table[str(q)] = row
  return {"images": len(files), "size": "112x112", "table": table}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--quality", type=float, default=50)
  ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds: every codec timed once per round")
  ap.add_argument("--reps", type=int, default=3, help="timed calls per codec per round (the best is kept)")
  ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores, as XLA uses)")
  ap.add_argument("--no-compile", action="store_true", help="skip kornia under torch.compile")
  ap.add_argument("--no-fidelity", action="store_true")
  ap.add_argument("--no-dct-forms", action="store_true")
  ap.add_argument("--out", default=results.out_path("jpeg_throughput.json"))
  args = ap.parse_args(argv)

  threads = args.threads or os.cpu_count() or 1
  load_start = os.getloadavg()
  x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3), minval=-1.0, maxval=1.0)
  fns = _ours(x, args.quality)
  torch_fns, torch_info = _kornia(np.asarray(x), args.quality, threads, compiled=not args.no_compile)
  fns.update(torch_fns)
  per_round = interleaved(fns, args.batch, args.rounds, args.reps)
  speed = {n: statistics.median(v) for n, v in per_round.items()}
  dct = {} if args.no_dct_forms else _dct_forms(x, args.reps)
  fidelity = None if args.no_fidelity else _fidelity()

  print(f"\nthroughput, images/s ({args.batch} x {args.size}x{args.size}, QF {args.quality:g}, "
        f"{jax.default_backend()}, {threads} CPU threads)")
  print(f"{'codec':<16}{'forward':>12}{'fwd+bwd':>12}")
  for name in ("ours_ste", "ours_cubic", "kornia", "kornia_compiled"):
    if f"{name}_fwd" in speed or f"{name}_fwd_bwd" in speed:
      rates = [f"{speed[k]:>12.1f}" if k in speed else f"{'failed':>12}" for k in (f"{name}_fwd", f"{name}_fwd_bwd")]
      print(f"{name:<16}{''.join(rates)}   gradient: {GRADIENTS[name.removesuffix('_compiled')][:60]}...")
  for key, value in torch_info.items():
    if key.endswith("_error") or key.endswith("_missing"):
      print(f"  {key}: {value}")
  if dct:
    print("\nDCT forms (forward + inverse over all blocks of the batch), images/s")
  for key, value in dct.items():
    print(f"  {key:<28}{value:>10.1f}")
  if fidelity:
    print(f"\nfidelity: mean PSNR (dB) against Pillow over {fidelity['images']} aligned faces; bias = PSNR vs "
          "original minus libjpeg's (100 dB = identical)")
    cols = [c for c in ("ste", "cubic", "kornia") if f"{c}_vs_libjpeg" in fidelity["table"]["50"]]
    print(f"{'QF':>4}" + "".join(f"{c + ' dB':>12}{c + ' bias':>12}" for c in cols))
    for q, row in fidelity["table"].items():
      print(f"{q:>4}" + "".join(f"{row[c + '_vs_libjpeg']:>12.2f}{row[c + '_bias']:>+12.3f}" for c in cols))

  result = {
      "versions": {"jax": jax.__version__, "numpy": np.__version__, "pillow": Image.__version__,
                   **{k: v for k, v in torch_info.items() if k.endswith("_version")}},
      "settings": {"batch": args.batch, "size": args.size, "quality": args.quality, "rounds": args.rounds,
                   "reps": args.reps, "torch_threads": torch_info.get("torch_threads"),
                   "timing": "interleaved rounds, every codec once per round in a rotated order, best of reps calls "
                             "per round, median over rounds; fwd+bwd = jax.grad / torch backward of sum(out**2)"},
      "gradients": GRADIENTS,
      "throughput_images_per_s": speed,
      "throughput_per_round": per_round,
      "torch": {k: v for k, v in torch_info.items() if not k.endswith("_version")},
      "dct_forms_images_per_s": dct,
      "fidelity": fidelity,
  }
  print(f"\nwrote {results.write_report(args.out, 'jpeg_throughput', argv, result, load_start)}")


if __name__ == "__main__":
  main()
