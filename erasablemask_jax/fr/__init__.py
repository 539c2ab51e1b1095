"""Surrogate face-recognition networks in Flax (IResNet, IR/IR-SE, InceptionResnetV1, MobileFaceNet, MobileFace V2,
and any TensorFlow.js graph model through `fr.tfjs_graph`).

`load(directory)` / `load_bundled("mobilefacenet")` return a `Recogniser` with `embed(images)` and a pure
`apply_fn(variables, images_in_minus1_1)`; `fr.real_models.model_dir("shared:NAME")` gives the directory of one of the
six real models of ../shared/assets (converted once into a cache); `erasablemask_jax.fr.archs` registers the
architectures with `erasablemask_jax.convert`; `erasablemask_jax.fr.calibration` turns genuine/impostor pairs into
thresholds.
"""

from erasablemask_jax.fr.preprocess import Preprocessing
from erasablemask_jax.fr.preprocess import preprocess
from erasablemask_jax.fr.recogniser import BUNDLED
from erasablemask_jax.fr.recogniser import Recogniser
from erasablemask_jax.fr.recogniser import bundled_dir
from erasablemask_jax.fr.recogniser import embed_apply
from erasablemask_jax.fr.recogniser import from_abstract
from erasablemask_jax.fr.recogniser import from_variables
from erasablemask_jax.fr.recogniser import l2_normalise
from erasablemask_jax.fr.recogniser import load
from erasablemask_jax.fr.recogniser import load_bundled
from erasablemask_jax.fr import real_models  # noqa: E402,F401  (`shared:NAME`: the real models of ../shared/assets)
