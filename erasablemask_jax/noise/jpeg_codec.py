"""JPEG compression as a JAX function that reproduces libjpeg, plus an exact host round trip.

`jpeg(images, quality)` re-implements, in integer `jnp` arithmetic, what Pillow (libjpeg-turbo, baseline, 4:2:0,
`islow` DCT, fancy upsampling) does when it saves an image at `quality` and decodes it again:

1. RGB -> YCbCr with libjpeg's 16-bit fixed-point tables (jccolor.c `rgb_ycc_convert`).
2. 4:2:0 chroma downsampling: the mean of each 2x2 block with the alternating bias 1, 2, 1, 2, ... along a row
   (jcsample.c `h2v2_downsample`); the right edge is padded by replicating the last image column before averaging,
   the bottom edge by replicating the last image row and then the last downsampled row (jcprepct.c).
3. 8x8 blocks, level shift by -128, the LL&M integer DCT (jfdctint.c `jpeg_fdct_islow`: 13-bit constants, results scaled
   by 8). Both passes are linear maps between roundings, so each is ONE integer matrix product followed by a rounding
   right shift `(y + 2^(s-1)) >> s`; the matrices are derived below by running libjpeg's butterflies on unit vectors.
4. Quantisation with libjpeg-turbo's reciprocal multiplication (jcdctmgr.c `compute_reciprocal`/`quantize`):
   `q = sign(t) * (((|t| + c) * f) >> r)` for divisor `d = 8 Q`, which is `round(t / d)` up to libjpeg-turbo's quirks.
   `Q` is the standard table scaled by quality exactly as jcparam.c does it (`jpeg_quality_scaling`,
   `jpeg_add_quant_table` with force_baseline, as Pillow calls it).
5. Dequantisation `q * Q` and the integer inverse DCT (jidctint.c `jpeg_idct_islow`, again two integer matrix products
   with rounding shifts), `+128`, clamped to [0, 255].
6. "Fancy" chroma upsampling (jdsample.c `h2v2_fancy_upsample`): weights 9/16, 3/16, 3/16, 1/16 with rounding +8 for
   even and +7 for odd output columns, edges replicated at the downsampled size.
7. YCbCr -> RGB with libjpeg's tables (jdcolor.c `ycc_rgb_convert`), clamped to [0, 255].

With `rounding="ste"` the forward value is that integer pipeline (bit-exact against Pillow in our tests) and the gradient
is straight-through for every rounding and clamp: it is the Jacobian of the same pipeline computed in real numbers
without rounding. In that real-valued pipeline the DCT, the division by `Q`, the multiplication by `Q` and the inverse
DCT compose to the identity, so the gradient is the linear map
`d out / d in = C^-1 diag(1, U D, U D) C` (C: colour transform, D: 2x2 chroma average, U: fancy upsampling), computed
directly. With `rounding="cubic"` the whole codec runs in float32 with the orthonormal DCT as matrix products and the
quantiser `round(x) + (x - round(x))^3` (Shin & Song 2017, as kornia implements it), whose gradient is
`3 (x - round(x))^2`.

DCT form: separable 8x8 matrix products over one block axis at a time, on blocks kept in the reshape-only layout
(N, H/8, 8, W/8, 8). int32 (exact path): broadcast multiply + sum; float32 (cubic path): `tensordot`. Both were the
fastest of the forms measured in benchmarks/jpeg_throughput.py for their dtype (see `_apply_along`).

`jpeg_libjpeg` calls Pillow itself through `jax.pure_callback`: a host round trip (device -> host -> libjpeg -> device),
exact by definition, with an identity (straight-through) gradient. It works under jit and vmap on CPU and GPU hosts,
not on TPU pods without host callbacks, and it serialises the batch through the host.
"""

from __future__ import annotations

import functools
import io
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Standard tables (ITU T.81 Annex K, as in jcparam.c), natural (row-major) order.
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99], np.int32)
_STD_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, np.int32)

ROUNDINGS = ("ste", "cubic")


def _fix(x: float, bits: int) -> int:
  """libjpeg's FIX(x) = (long)(x * 2^bits + 0.5) for x >= 0; negative constants are written -FIX(|x|) there."""
  return int(abs(x) * (1 << bits) + 0.5) * (1 if x >= 0 else -1)


# --------------------------------------------------------------------------------------------------------------------
# libjpeg's islow DCT as integer matrices.

_CONST_BITS = 13
_PASS1_BITS = 2


def _islow_fdct_1d(d: list[int]) -> list[int]:
  """One pass of jfdctint.c on 8 Python ints, returning the values BEFORE the final descale.

  Outputs 0 and 4 are returned pre-multiplied by 2^13 so that every output is descaled by the same shift:
  11 in pass 1 (their `<< PASS1_BITS` becomes exact) and 15 in pass 2 (their `DESCALE(., PASS1_BITS)` is unchanged).
  """
  f = lambda x: _fix(x, _CONST_BITS)
  tmp0, tmp7 = d[0] + d[7], d[0] - d[7]
  tmp1, tmp6 = d[1] + d[6], d[1] - d[6]
  tmp2, tmp5 = d[2] + d[5], d[2] - d[5]
  tmp3, tmp4 = d[3] + d[4], d[3] - d[4]
  tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
  tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
  out = [0] * 8
  out[0] = (tmp10 + tmp11) << _CONST_BITS
  out[4] = (tmp10 - tmp11) << _CONST_BITS
  z1 = (tmp12 + tmp13) * f(0.541196100)
  out[2] = z1 + tmp13 * f(0.765366865)
  out[6] = z1 - tmp12 * f(1.847759065)
  z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
  z5 = (z3 + z4) * f(1.175875602)
  tmp4 *= f(0.298631336)
  tmp5 *= f(2.053119869)
  tmp6 *= f(3.072711026)
  tmp7 *= f(1.501321110)
  z1 *= -f(0.899976223)
  z2 *= -f(2.562915447)
  z3 = z3 * -f(1.961570560) + z5
  z4 = z4 * -f(0.390180644) + z5
  out[7] = tmp4 + z1 + z3
  out[5] = tmp5 + z2 + z4
  out[3] = tmp6 + z2 + z3
  out[1] = tmp7 + z1 + z4
  return out


def _islow_idct_1d(d: list[int]) -> list[int]:
  """One pass of jidctint.c on 8 (dequantised) Python ints, returning the values before the descale."""
  f = lambda x: _fix(x, _CONST_BITS)
  z2, z3 = d[2], d[6]
  z1 = (z2 + z3) * f(0.541196100)
  tmp2 = z1 - z3 * f(1.847759065)
  tmp3 = z1 + z2 * f(0.765366865)
  tmp0 = (d[0] + d[4]) << _CONST_BITS
  tmp1 = (d[0] - d[4]) << _CONST_BITS
  tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
  tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
  tmp0, tmp1, tmp2, tmp3 = d[7], d[5], d[3], d[1]
  z1, z2, z3, z4 = tmp0 + tmp3, tmp1 + tmp2, tmp0 + tmp2, tmp1 + tmp3
  z5 = (z3 + z4) * f(1.175875602)
  tmp0 *= f(0.298631336)
  tmp1 *= f(2.053119869)
  tmp2 *= f(3.072711026)
  tmp3 *= f(1.501321110)
  z1 *= -f(0.899976223)
  z2 *= -f(2.562915447)
  z3 = z3 * -f(1.961570560) + z5
  z4 = z4 * -f(0.390180644) + z5
  tmp0 += z1 + z3
  tmp1 += z2 + z4
  tmp2 += z2 + z3
  tmp3 += z1 + z4
  return [tmp10 + tmp3, tmp11 + tmp2, tmp12 + tmp1, tmp13 + tmp0,
          tmp13 - tmp0, tmp12 - tmp1, tmp11 - tmp2, tmp10 - tmp3]


def _matrix_of(fn: Callable[[list[int]], list[int]]) -> np.ndarray:
  """The 8x8 integer matrix M with fn(x) = M x (fn is linear: no rounding happens inside a pass)."""
  eye = np.eye(8, dtype=np.int64)
  m = np.array([fn([int(v) for v in eye[k]]) for k in range(8)], np.int64).T
  assert np.abs(m).max() < 2**31
  return m.astype(np.int32)


_FDCT_M = _matrix_of(_islow_fdct_1d)
_IDCT_M = _matrix_of(_islow_idct_1d)
_FDCT_SHIFT1 = _CONST_BITS - _PASS1_BITS  # 11
_FDCT_SHIFT2 = _CONST_BITS + _PASS1_BITS  # 15
_IDCT_SHIFT1 = _CONST_BITS - _PASS1_BITS  # 11
_IDCT_SHIFT2 = _CONST_BITS + _PASS1_BITS + 3  # 18


def _orthonormal_dct_matrix() -> np.ndarray:
  """D[u, x] = c(u)/2 cos((2x+1) u pi / 16), c(0) = 1/sqrt(2): the JPEG DCT, orthonormal, F = D X D^T."""
  u = np.arange(8)[:, None]
  x = np.arange(8)[None, :]
  d = 0.5 * np.cos((2 * x + 1) * u * np.pi / 16)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


_DCT_F32 = _orthonormal_dct_matrix()


def _descale(y: jax.Array, shift: int) -> jax.Array:
  """libjpeg's DESCALE: round-half-up arithmetic right shift."""
  return (y + (1 << (shift - 1))) >> shift


def _apply_along(x: jax.Array, m: np.ndarray, axis: int) -> jax.Array:
  """y[.., j, ..] = sum_k m[j, k] x[.., k, ..] along `axis` (length 8) of a 5-d block tensor.

  int32 (the exact path): a broadcast multiply and a sum over k, exact on every backend, one fused multiply-reduce
  loop and few HLO ops (fast to compile); on XLA:CPU it measured ~2.5x faster than a dot (int32 dots have no BLAS
  path) and than the products written out as slices. float32 (the cubic path): `tensordot` with the 8x8 matrix, whose
  transpose in the backward pass is again a dot; it measured 3x faster than the broadcast form under `grad`.
  See benchmarks/jpeg_throughput.py.
  """
  if jnp.issubdtype(x.dtype, jnp.integer):
    mat = jnp.asarray(m, x.dtype).reshape((8, 8) + (1,) * (x.ndim - 1 - axis))
    return jnp.sum(jnp.expand_dims(x, axis) * mat, axis=axis + 1)
  return jnp.moveaxis(jnp.tensordot(jnp.asarray(m, x.dtype), x, axes=((1,), (axis,))), 0, axis)


# Blocks are kept in the reshape-only layout (B, H/8, 8, W/8, 8): axis 2 is the row inside a block, axis 4 the column.
_ROW_AXIS, _COL_AXIS = 2, 4


def _fdct_islow(blocks: jax.Array) -> jax.Array:
  """jpeg_fdct_islow on int32 level-shifted blocks: pass 1 along each block row, pass 2 down each column; x8 scale."""
  t = _descale(_apply_along(blocks, _FDCT_M, _COL_AXIS), _FDCT_SHIFT1)
  return _descale(_apply_along(t, _FDCT_M, _ROW_AXIS), _FDCT_SHIFT2)


def _idct_islow(coefs: jax.Array) -> jax.Array:
  """jpeg_idct_islow on dequantised int32 blocks: pass 1 down columns, pass 2 along rows; clamped samples 0..255."""
  t = _descale(_apply_along(coefs, _IDCT_M, _ROW_AXIS), _IDCT_SHIFT1)
  return jnp.clip(_descale(_apply_along(t, _IDCT_M, _COL_AXIS), _IDCT_SHIFT2) + 128, 0, 255)


# --------------------------------------------------------------------------------------------------------------------
# Quantisation tables.


def quant_tables(quality) -> jax.Array:
  """libjpeg's baseline quantisation tables for a quality factor.

  Args:
    quality: scalar or array of quality factors; rounded to integers and clamped to [1, 100] as libjpeg does.

  Returns:
    int32 array of shape quality.shape + (2, 64): [luma, chroma] tables in natural order, where
    `s = 5000 / q if q < 50 else 200 - 2 q` (integer division) and `Q = clip((basic * s + 50) // 100, 1, 255)`.
  """
  q = jnp.clip(jnp.round(jnp.asarray(quality, jnp.float32)).astype(jnp.int32), 1, 100)
  scale = jnp.where(q < 50, 5000 // q, 200 - 2 * q)[..., None, None]
  basic = jnp.asarray(np.stack([_STD_LUMA, _STD_CHROMA]))
  return jnp.clip((basic * scale + 50) // 100, 1, 255)


def _quantize_libjpeg_turbo(t: jax.Array, qtable: jax.Array) -> jax.Array:
  """libjpeg-turbo's quantiser: divide the 8x-scaled DCT output t by d = 8 Q with a reciprocal multiplication.

  compute_reciprocal(d): b = floor(log2 d), r = 16 + b, f = 2^r // d, c = d // 2; if d is a power of two then
  f //= 2, r -= 1; elif 2^r mod d <= d // 2 then c += 1; else f += 1. quantize: sign(t) * (((|t| + c) f) >> r).
  """
  d = qtable * 8
  b = 31 - jax.lax.clz(d)
  r = 16 + b
  one = jnp.left_shift(jnp.int32(1), r)
  f, rem = one // d, one % d
  pow2 = rem == 0
  small = jnp.logical_and(~pow2, rem <= d // 2)
  f = jnp.where(pow2, f >> 1, jnp.where(small, f, f + 1))
  r = jnp.where(pow2, r - 1, r)
  c = d // 2 + small.astype(jnp.int32)
  mag = ((jnp.abs(t) + c) * f) >> r
  return jnp.where(t < 0, -mag, mag)


# --------------------------------------------------------------------------------------------------------------------
# Sampling. Planes are (B, H, W): one array per colour component, batch and component folded into B.


def _edge_pad(p: jax.Array, h: int, w: int) -> jax.Array:
  """Replicate the last row/column of (B, H0, W0) up to (B, h, w)."""
  return jnp.pad(p, ((0, 0), (0, h - p.shape[1]), (0, w - p.shape[2])), mode="edge")


def _downsample_2x2(p: jax.Array, exact: bool) -> jax.Array:
  """2x2 mean; exact: (a + b + c + d + bias) >> 2 with bias 1 on even and 2 on odd output columns (h2v2_downsample)."""
  s = p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]
  if not exact:
    return s / 4
  bias = 1 + (jnp.arange(s.shape[2], dtype=jnp.int32) % 2)
  return (s + bias) >> 2


def _interleave(even: jax.Array, odd: jax.Array, axis: int) -> jax.Array:
  """Interleave two equally shaped arrays along `axis`: out[2i] = even[i], out[2i + 1] = odd[i]."""
  stacked = jnp.stack([even, odd], axis=axis + 1)
  shape = list(even.shape)
  shape[axis] *= 2
  return stacked.reshape(shape)


def _fancy_upsample_2x2(p: jax.Array, exact: bool) -> jax.Array:
  """jdsample.c h2v2_fancy_upsample on (B, h, w) with replicated edges -> (B, 2h, 2w).

  Vertical: colsum = 3 * nearer row + farther row (row above for even output rows, below for odd).
  Horizontal: even output = (3 * this + left + 8) >> 4, odd output = (3 * this + right + 7) >> 4.
  Falls back to pixel replication when w <= 2, as libjpeg does.
  """
  if p.shape[2] <= 2:
    return jnp.repeat(jnp.repeat(p, 2, axis=1), 2, axis=2)
  pv = jnp.pad(p, ((0, 0), (1, 1), (0, 0)), mode="edge")
  rows = _interleave(3 * p + pv[:, :-2], 3 * p + pv[:, 2:], axis=1)
  ph = jnp.pad(rows, ((0, 0), (0, 0), (1, 1)), mode="edge")
  left, right = 3 * rows + ph[:, :, :-2], 3 * rows + ph[:, :, 2:]
  if exact:
    left, right = (left + 8) >> 4, (right + 7) >> 4
  else:
    left, right = left / 16, right / 16
  return _interleave(left, right, axis=2)


def _chroma_down(c: jax.Array, h: int, w: int, exact: bool) -> jax.Array:
  """Downsample a padded (B, Hp, Wp) chroma plane as libjpeg's prep controller does for an h x w image.

  The right edge was padded by replicating image columns (expand_right_edge, before averaging); the bottom edge is
  padded by replicating image rows up to an even count and then the last DOWNSAMPLED row (expand_bottom_edge after).
  """
  hp, wp = c.shape[1:]
  d = _downsample_2x2(c, exact)
  return _edge_pad(d[:, :(h + 1) // 2], hp // 2, wp // 2)


def _chroma_up(c: jax.Array, h: int, w: int, exact: bool) -> jax.Array:
  """Crop a decoded chroma plane to its downsampled size, fancy-upsample it and crop to h x w."""
  return _fancy_upsample_2x2(c[:, :(h + 1) // 2, :(w + 1) // 2], exact)[:, :h, :w]


# --------------------------------------------------------------------------------------------------------------------
# Colour conversion.

_SB = 16  # jccolor.c/jdcolor.c SCALEBITS
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.16874, -0.33126, 0.5], [0.5, -0.41869, -0.08131]])
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.34414, -0.71414], [1.0, 1.772, 0.0]])


def _rgb_to_ycc_int(r: jax.Array, g: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """jccolor.c rgb_ycc_convert on int32 planes: 16-bit fixed point, +1/2 rounding (1/2 - 2^-16 for chroma)."""
  f = [[_fix(v, _SB) for v in row] for row in _RGB_TO_YCC]
  half, off = 1 << (_SB - 1), 128 << _SB
  y = (f[0][0] * r + f[0][1] * g + f[0][2] * b + half) >> _SB
  cb = (f[1][0] * r + f[1][1] * g + f[1][2] * b + off + half - 1) >> _SB
  cr = (f[2][0] * r + f[2][1] * g + f[2][2] * b + off + half - 1) >> _SB
  return y, cb, cr


def _ycc_to_rgb_int(y: jax.Array, cb: jax.Array, cr: jax.Array) -> jax.Array:
  """jdcolor.c ycc_rgb_convert on int32 planes, clamped to [0, 255]; returns (B, H, W, 3)."""
  f = lambda x: _fix(x, _SB)
  half = 1 << (_SB - 1)
  cb, cr = cb - 128, cr - 128
  r = y + ((f(1.402) * cr + half) >> _SB)
  g = y + ((-f(0.34414) * cb - f(0.71414) * cr + half) >> _SB)
  b = y + ((f(1.772) * cb + half) >> _SB)
  return jnp.clip(jnp.stack([r, g, b], axis=-1), 0, 255)


def _mix(m: np.ndarray, a: jax.Array, b: jax.Array, c: jax.Array) -> list[jax.Array]:
  """[m[i, 0] a + m[i, 1] b + m[i, 2] c for each row i of the 3x3 matrix m]."""
  return [float(m[i, 0]) * a + float(m[i, 1]) * b + float(m[i, 2]) * c for i in range(3)]


# --------------------------------------------------------------------------------------------------------------------
# The pipelines.


def _padded_size(h: int, w: int) -> tuple[int, int]:
  return -(-h // 16) * 16, -(-w // 16) * 16


def _merge_planes(y: jax.Array, chroma: jax.Array) -> jax.Array:
  """Y (N, Hp, Wp) and chroma (2N, Hp/2, Wp/2) -> one (N, 3Hp/2, Wp) plane per image: Y on top, [Cb | Cr] below.

  All blocks then go through ONE transform (half the operations to compile and dispatch); blocks never straddle the
  seams because Hp and Wp are multiples of 16.
  """
  n = y.shape[0]
  return jnp.concatenate([y, jnp.concatenate([chroma[:n], chroma[n:]], axis=2)], axis=1)


def _split_planes(merged: jax.Array, hp: int) -> tuple[jax.Array, jax.Array]:
  y, chroma = merged[:, :hp], merged[:, hp:]
  wc = chroma.shape[2] // 2
  return y, jnp.concatenate([chroma[:, :, :wc], chroma[:, :, wc:]], axis=0)


def _merged_tables(qtables: jax.Array, hp: int, dtype) -> jax.Array:
  """(N, 2, 64) -> (N, 3Hp/16, 8, 1, 8): the luma table on the Y block rows, the chroma table below."""
  n = qtables.shape[0]
  rows = jnp.arange(3 * hp // 16) < hp // 8
  tables = qtables.reshape(n, 2, 1, 8, 1, 8).astype(dtype)
  return jnp.where(rows[None, :, None, None, None], tables[:, 0], tables[:, 1])


def _block_codec_int(plane: jax.Array, table: jax.Array) -> jax.Array:
  """Level shift, islow DCT, libjpeg-turbo quantisation, dequantisation and islow IDCT of int32 (N, H8, W8) planes.

  table: (N, H8/8, 8, 1, 8) quantisation table for each block row.
  """
  n, hp, wp = plane.shape
  coefs = _quantize_libjpeg_turbo(_fdct_islow((plane - 128).reshape(n, hp // 8, 8, wp // 8, 8)), table)
  return _idct_islow(coefs * table).reshape(n, hp, wp)


def _codec_int(pixels: jax.Array, qtables: jax.Array) -> jax.Array:
  """libjpeg's encode + decode on int32 (N, H, W, 3) samples in [0, 255]; qtables (N, 2, 64). Returns int32 samples."""
  n, h, w, _ = pixels.shape
  hp, wp = _padded_size(h, w)
  rgb = jnp.pad(jnp.moveaxis(pixels, -1, 0), ((0, 0), (0, 0), (0, hp - h), (0, wp - w)), mode="edge")
  y, cb, cr = _rgb_to_ycc_int(rgb[0], rgb[1], rgb[2])
  chroma = _chroma_down(jnp.concatenate([cb, cr]), h, w, True)
  merged = _block_codec_int(_merge_planes(y, chroma), _merged_tables(qtables, hp, jnp.int32))
  y, chroma = _split_planes(merged, hp)
  chroma = _chroma_up(chroma, h, w, True)
  return _ycc_to_rgb_int(y[:, :h, :w], chroma[:n], chroma[n:])


def _chroma_resampling_matrix(n: int, box: bool) -> np.ndarray:
  """(n, n) matrix of 1-d chroma down- then up-sampling in real numbers, edges as libjpeg handles them.

  Down: out[i] = (x[2i] + x[min(2i + 1, n - 1)]) / 2 for i < ceil(n / 2). Up (fancy): out[2i] = 3/4 d[i] + 1/4 d[i - 1],
  out[2i + 1] = 3/4 d[i] + 1/4 d[i + 1] with indices clamped to [0, ceil(n / 2) - 1]; `box` (libjpeg's fallback for
  downsampled widths <= 2): out[o] = d[o // 2]. Cropped to n rows. The 2-d operator is the outer product of two of these.
  """
  m = (n + 1) // 2
  down = np.zeros((m, n))
  for i in range(m):
    down[i, 2 * i] += 0.5
    down[i, min(2 * i + 1, n - 1)] += 0.5
  up = np.zeros((2 * m, m))
  for o in range(2 * m):
    i = o // 2
    if box:
      up[o, i] = 1.0
    else:
      up[o, i] += 0.75
      up[o, min(max(i - 1 if o % 2 == 0 else i + 1, 0), m - 1)] += 0.25
  return (up @ down)[:n].astype(np.float32)


def _linear_jacobian(x255: jax.Array) -> jax.Array:
  """The codec in real numbers with identity rounding and no clamps, without its constant offsets (a linear map).

  out = C^-1 [Y, R_h Cb R_w^T, R_h Cr R_w^T] with [Y, Cb, Cr] = C x: colour transform, then the chroma 2x2 mean and
  fancy upsampling as two small dense matrices (`_chroma_resampling_matrix`), so that this map and its transpose are
  matrix products. The DCT, /Q, *Q and the inverse DCT compose to the identity and are omitted. This is the
  straight-through Jacobian of `jpeg(rounding="ste")`.
  """
  n, h, w, _ = x255.shape
  box = (w + 1) // 2 <= 2
  rh, rw = jnp.asarray(_chroma_resampling_matrix(h, box)), jnp.asarray(_chroma_resampling_matrix(w, box))
  rgb = jnp.moveaxis(x255, -1, 0)
  y, cb, cr = _mix(_RGB_TO_YCC, rgb[0], rgb[1], rgb[2])
  chroma = jnp.einsum("hk,bkl,wl->bhw", rh, jnp.concatenate([cb, cr]), rw)
  return jnp.stack(_mix(_YCC_TO_RGB, y, chroma[:n], chroma[n:]), axis=-1)


@jax.custom_jvp
def _codec_ste(x255: jax.Array, qtables: jax.Array) -> jax.Array:
  """Forward: libjpeg's integer codec on round(clip(x255)). Derivative: `_linear_jacobian` (straight through).

  A custom JVP rather than a custom VJP: reverse mode transposes the linear rule, and forward-over-reverse (the
  Hessian-vector products of the meta-auxiliary attack) can differentiate through it as well.
  """
  pixels = jnp.clip(jnp.round(x255), 0, 255).astype(jnp.int32)
  return _codec_int(pixels, qtables).astype(jnp.float32)


@_codec_ste.defjvp
def _codec_ste_jvp(primals, tangents):
  x255, qtables = primals
  tx, _ = tangents
  return _codec_ste(x255, qtables), _linear_jacobian(tx)


def _cubic_round(x: jax.Array) -> jax.Array:
  """round(x) + (x - round(x))^3, the differentiable rounding of Shin & Song (2017) as in kornia.

  Its forward value is within 1/8 of round(x) and its gradient is 3 (x - round(x))^2 (round is piecewise constant).
  """
  r = jax.lax.stop_gradient(jnp.round(x))
  return r + (x - r) ** 3


def _block_codec_float(plane: jax.Array, table: jax.Array) -> jax.Array:
  """F = D X D^T, F' = cubic_round(F / Q) Q, X' = D^T F' D on float (N, H8, W8) planes (D: orthonormal 8x8 DCT)."""
  n, hp, wp = plane.shape
  blocks = (plane - 128.0).reshape(n, hp // 8, 8, wp // 8, 8)
  coefs = _apply_along(_apply_along(blocks, _DCT_F32, _COL_AXIS), _DCT_F32, _ROW_AXIS)
  coefs = _cubic_round(coefs / table) * table
  out = _apply_along(_apply_along(coefs, _DCT_F32.T, _ROW_AXIS), _DCT_F32.T, _COL_AXIS)
  return out.reshape(n, hp, wp) + 128.0


def _codec_float(x255: jax.Array, qtables: jax.Array) -> jax.Array:
  """The codec in float32 with the cubic quantiser. x255: (N, H, W, 3) in [0, 255]; output clipped to [0, 255]."""
  n, h, w, _ = x255.shape
  hp, wp = _padded_size(h, w)
  rgb = jnp.pad(jnp.moveaxis(x255, -1, 0), ((0, 0), (0, 0), (0, hp - h), (0, wp - w)), mode="edge")
  y, cb, cr = _mix(_RGB_TO_YCC, rgb[0], rgb[1], rgb[2])
  chroma = _chroma_down(jnp.concatenate([cb, cr]) + 128.0, h, w, False)
  merged = _block_codec_float(_merge_planes(y, chroma), _merged_tables(qtables, hp, jnp.float32))
  y, chroma = _split_planes(merged, hp)
  chroma = _chroma_up(chroma, h, w, False) - 128.0
  return jnp.clip(jnp.stack(_mix(_YCC_TO_RGB, y[:, :h, :w], chroma[:n], chroma[n:]), axis=-1), 0.0, 255.0)


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"jpeg expects NHWC RGB images of shape (N, H, W, 3); got shape {images.shape}")


def _per_image_quality(quality, n: int) -> jax.Array:
  q = jnp.asarray(quality, jnp.float32)
  if q.ndim > 1 or (q.ndim == 1 and q.shape[0] != n):
    raise ValueError(f"quality must be a scalar or have one value per image ({n}); got shape {q.shape}")
  return jnp.broadcast_to(q, (n,))


@functools.partial(jax.jit, static_argnames="rounding")
def jpeg(images: jax.Array, quality, *, rounding: str = "ste") -> jax.Array:
  """Differentiable JPEG compression and decompression (baseline, 4:2:0) matching libjpeg/Pillow.

  Args:
    images: float (N, H, W, 3) RGB in [-1, 1], any H and W (edges are padded as libjpeg pads them, then cropped).
      Values are mapped to [0, 255] by `(x + 1) * 127.5`, clipped, and, in "ste" mode, rounded to integers.
    quality: libjpeg quality factor 1..100, a scalar or an array of shape (N,) (one per image); rounded to an integer.
    rounding: "ste": forward is libjpeg's integer codec exactly (see the module docstring), backward is the
      straight-through Jacobian of the real-valued codec, `C^-1 diag(1, U D, U D) C`, through every rounding and clamp.
      "cubic": float32 codec with the quantiser `round(x) + (x - round(x))^3`; approximate forward, smooth
      backward.

  Returns:
    float32 (N, H, W, 3) in [-1, 1]: the decoded image, `pixel / 127.5 - 1`.
  """
  _check_images(images)
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
  images = images.astype(jnp.float32)
  qtables = quant_tables(_per_image_quality(quality, images.shape[0]))
  x255 = (images + 1.0) * 127.5
  if rounding == "cubic":
    return _codec_float(jnp.clip(x255, 0.0, 255.0), qtables) / 127.5 - 1.0
  return _codec_ste(x255, qtables) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------------------
# Exact mode: Pillow on the host.


def pillow_jpeg_uint8(pixels: np.ndarray, quality: int) -> np.ndarray:
  """Round-trip one uint8 (H, W, 3) image through Pillow's JPEG encoder (4:2:0) and decoder."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(pixels, np.uint8), "RGB").save(
      buf, format="JPEG", quality=int(quality), subsampling="4:2:0")
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def _host_jpeg(pixels: np.ndarray, quality: np.ndarray) -> np.ndarray:
  shape = pixels.shape
  flat = pixels.reshape((-1,) + shape[-3:])
  qs = np.broadcast_to(quality, shape[:-3]).reshape(-1)
  out = np.stack([pillow_jpeg_uint8(img, q) for img, q in zip(flat, qs)])
  return out.reshape(shape)


@jax.jit
def jpeg_libjpeg(images: jax.Array, quality) -> jax.Array:
  """Real libjpeg (Pillow, 4:2:0) through `jax.pure_callback`, with a straight-through (identity) gradient.

  A HOST ROUND TRIP: the batch is copied to the host, each image is encoded and decoded by Pillow, and the result is
  copied back. Exact by definition and usable under jit and vmap, but slow, sequential and unavailable where host
  callbacks are (e.g. some TPU setups). Use `jpeg` inside training.

  Args:
    images: float (N, H, W, 3) in [-1, 1]; rounded to uint8 as `round((x + 1) * 127.5)`.
    quality: scalar or (N,) quality factors 1..100 (rounded to integers).

  Returns:
    float32 (N, H, W, 3) in [-1, 1].
  """
  _check_images(images)
  images = images.astype(jnp.float32)
  q = jnp.clip(jnp.round(_per_image_quality(quality, images.shape[0])), 1, 100).astype(jnp.int32)
  pixels = jnp.clip(jnp.round((jax.lax.stop_gradient(images) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  decoded = jax.pure_callback(_host_jpeg, jax.ShapeDtypeStruct(pixels.shape, jnp.uint8), pixels, q,
                              vmap_method="broadcast_all")
  exact = decoded.astype(jnp.float32) / 127.5 - 1.0
  return images + jax.lax.stop_gradient(exact - images)
