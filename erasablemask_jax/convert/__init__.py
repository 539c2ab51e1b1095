"""PyTorch / MXNet / TensorFlow.js -> Flax weight conversion: the reusable library behind `tools.convert_torch_weights`.

- `read_state_dict(path)`: torch (`weights_only=True`) or safetensors file -> `{name: np.ndarray}`.
- `mxnet`: numpy-only reader of MXNet `.params` NDArray lists (`read_ndarray_list`) and `-symbol.json` graphs
  (`read_symbol`, parameter-shape inference and layer checks), and the `arg:`/`aux:` rename (`mxnet_to_flax_flat`).
- `tfjs`: numpy-only reader of TensorFlow.js graph models (`read_graph_model`: `model.json` nodes with decoded attrs,
  the weights manifest checked before a shard is read (paths inside the model's folder, shard sizes, sane shapes),
  float16 and uint8/uint16 affine dequantisation); the graph is run by `erasablemask_jax.fr.tfjs_graph`.
- Rename tables (`rules`): `Rule(torch, flax, kind)` rows, `rename_flat(state, rules, ignore)` (unclaimed keys come
  back as `unmapped/<key>` for the strict merge to name), `flax_to_torch` the inverse; the one rename style of every
  converter (LPIPS, FID, MTCNN write their tables out, the FR zoo generates its own).
- Layout helpers: `conv_oihw_to_hwio`, `depthwise_oihw_to_hwio`, `linear_to_dense`, `linear_after_nchw_flatten`,
  and `torch_to_flax_flat`, the generic rename by the table `torch_rules` generates from the tensors (BatchNorm /
  conv / Linear / PReLU).
- `strict_merge(flat, abstract_variables)`: exact one-to-one merge naming every mismatch in one error.
- `register_arch(name, ArchSpec(...))` / `get_arch` / `list_archs`: the architecture registry; provider modules outside
  this package register at import, and a caller imports the providers it needs (see `registry`).
- `write_model_dir` / `read_model_dir`: atomic orbax + `card.json` model directories.
- `convert_checkpoint(arch, checkpoint, out_dir, force, symbol)`: all of the above in one call.
"""

from erasablemask_jax.convert import mxnet
from erasablemask_jax.convert import tfjs
from erasablemask_jax.convert.checkpoint import CONVERTER_VERSION
from erasablemask_jax.convert.checkpoint import convert_checkpoint
from erasablemask_jax.convert.checkpoint import convert_state_dict
from erasablemask_jax.convert.checkpoint import sha256_file
from erasablemask_jax.convert.layout import conv_oihw_to_hwio
from erasablemask_jax.convert.layout import default_module_path
from erasablemask_jax.convert.layout import depthwise_oihw_to_hwio
from erasablemask_jax.convert.layout import linear_after_nchw_flatten
from erasablemask_jax.convert.layout import linear_to_dense
from erasablemask_jax.convert.layout import torch_rules
from erasablemask_jax.convert.layout import torch_to_flax_flat
from erasablemask_jax.convert.merge import StrictMergeError
from erasablemask_jax.convert.merge import abstract_init
from erasablemask_jax.convert.merge import flatten_variables
from erasablemask_jax.convert.merge import strict_merge
from erasablemask_jax.convert.model_dir import CARD_FILE
from erasablemask_jax.convert.model_dir import ModelDirError
from erasablemask_jax.convert.model_dir import read_card
from erasablemask_jax.convert.model_dir import read_model_dir
from erasablemask_jax.convert.model_dir import write_card
from erasablemask_jax.convert.model_dir import write_model_dir
from erasablemask_jax.convert.registry import ArchSpec
from erasablemask_jax.convert.registry import get_arch
from erasablemask_jax.convert.registry import list_archs
from erasablemask_jax.convert.registry import register_arch
from erasablemask_jax.convert.rules import Rule
from erasablemask_jax.convert.rules import rename_flat
from erasablemask_jax.convert.state_dict import CheckpointError
from erasablemask_jax.convert.state_dict import read_state_dict
