"""Noise pool and robustness transforms: a differentiable JPEG that reproduces libjpeg, and the other distortions."""

from erasablemask_jax.noise.jpeg_codec import jpeg
from erasablemask_jax.noise.jpeg_codec import jpeg_libjpeg
from erasablemask_jax.noise.jpeg_codec import quant_tables
from erasablemask_jax.noise.pool import EVAL_TRANSFORMS
from erasablemask_jax.noise.pool import TRAIN_POOL
from erasablemask_jax.noise.pool import get_eval_transform
from erasablemask_jax.noise.pool import make_train_pool
from erasablemask_jax.noise.pool import make_transform
from erasablemask_jax.noise.pool import parse_member
from erasablemask_jax.noise.transforms import center_crop_resize
from erasablemask_jax.noise.transforms import gaussian_noise
from erasablemask_jax.noise.transforms import median_filter
from erasablemask_jax.noise.transforms import random_rotation
from erasablemask_jax.noise.transforms import resize_down_up
from erasablemask_jax.noise.transforms import rotate

__all__ = [
    "EVAL_TRANSFORMS", "TRAIN_POOL", "center_crop_resize", "gaussian_noise", "get_eval_transform", "jpeg",
    "jpeg_libjpeg", "make_train_pool", "make_transform", "median_filter", "parse_member", "quant_tables",
    "random_rotation", "resize_down_up", "rotate",
]
