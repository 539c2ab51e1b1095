"""The PyTorch twins of the JAX networks, for the reference step (`benchmarks/torch_reference.py`): AttGAN's encoder,
decoder and discriminator (attribute names equal to the Flax module names, so module paths map one to one), the
converter in reverse (Flax variables -> torch state dict), and the face-recognition surrogates as the attack sees them
(the zoo's torch definitions in `benchmarks/torch_nets.py`, the tiny test net, the `@flip` view, BatchNorm folding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import torch_nets  # torch definitions of the FR zoo with the published key names
from erasablemask_jax import convert
from erasablemask_jax.fr import Preprocessing

# ---------------------------------------------------------------------------------------------------------------------
# AttGAN networks in torch, attribute names equal to the Flax module names (so the module path maps one to one).


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
  """`(1 - t) a + t b` in the same floating-point form as `erasablemask_jax.models.lerp`."""
  if t == 0.0:
    return a
  if t == 1.0:
    return b
  if t < 0.5:
    return a + t * (b - a)
  return b - (1.0 - t) * (b - a)


def tile(att: torch.Tensor, size: int) -> torch.Tensor:
  """`(B, A)` -> `(B, A, size, size)`."""
  return att[:, :, None, None].expand(att.shape[0], att.shape[1], size, size)


def _widths(dim: int, num_layers: int, max_dim: int) -> list[int]:
  return [min(dim * 2**i, max_dim) for i in range(num_layers)]


class Encoder(nn.Module):
  """`num_layers` x [Conv 4x4/2 (no bias) -> BatchNorm -> LeakyReLU(0.2)], every layer's output returned."""

  def __init__(self, dim: int = 64, num_layers: int = 5, max_dim: int = 1024):
    super().__init__()
    c_in = 3
    for i, c in enumerate(_widths(dim, num_layers, max_dim)):
      setattr(self, f"enc_layers_{i}_conv", nn.Conv2d(c_in, c, 4, 2, 1, bias=False))
      setattr(self, f"enc_layers_{i}_bn", nn.BatchNorm2d(c, eps=1e-5, momentum=0.1))
      c_in = c
    self.num_layers = num_layers

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    features = []
    for i in range(self.num_layers):
      x = F.leaky_relu(getattr(self, f"enc_layers_{i}_bn")(getattr(self, f"enc_layers_{i}_conv")(x)), 0.2)
      features.append(x)
    return features


class Decoder(nn.Module):
  """ConvTranspose 4x4/2 -> BatchNorm -> ReLU (tanh last), shortcut / injection concatenations, clean-branch fusion."""

  def __init__(self, enc_dim: int, dec_dim: int, num_layers: int, max_dim: int, num_attributes: int,
               shortcut_layers: int = 1, inject_layers: int = 1):
    super().__init__()
    enc = _widths(enc_dim, num_layers, max_dim)
    self.num_layers, self.shortcut_layers, self.inject_layers = num_layers, shortcut_layers, inject_layers
    c_in = enc[-1] + num_attributes
    for i in range(num_layers):
      last = i == num_layers - 1
      c = 3 if last else min(dec_dim * 2**(num_layers - i - 1), max_dim)
      setattr(self, f"dec_layers_{i}_conv", nn.ConvTranspose2d(c_in, c, 4, 2, 1, bias=last))
      if not last:
        setattr(self, f"dec_layers_{i}_bn", nn.BatchNorm2d(c, eps=1e-5, momentum=0.1))
        c_in = c + (enc[num_layers - 2 - i] if i < shortcut_layers else 0) + (num_attributes if i < inject_layers
                                                                               else 0)

  def _layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
    h = getattr(self, f"dec_layers_{i}_conv")(h)
    if i == self.num_layers - 1:
      return torch.tanh(h)
    return F.relu(getattr(self, f"dec_layers_{i}_bn")(h))

  def _concat(self, i: int, h: torch.Tensor, zs: Sequence[torch.Tensor], att: torch.Tensor) -> torch.Tensor:
    if i < self.shortcut_layers:
      h = torch.cat([h, zs[self.num_layers - 2 - i]], dim=1)
    if i < self.inject_layers:
      h = torch.cat([h, tile(att, h.shape[2])], dim=1)
    return h

  def forward(self, zs, att, clean_zs=None, gamma: float = 0.0):
    start = lambda z: torch.cat([z[-1], tile(att, z[-1].shape[2])], dim=1)
    h = start(zs)
    if clean_zs is None:
      for i in range(self.num_layers):
        h = self._layer(i, h)
        if i < self.num_layers - 1:
          h = self._concat(i, h, zs, att)
      return h
    c = start(clean_zs)
    for i in range(self.num_layers):
      c = self._layer(i, c)
      h = lerp(self._layer(i, h), c, gamma)
      if i < self.num_layers - 1:
        h, c = self._concat(i, h, zs, att), self._concat(i, c, clean_zs, att)
    return h, c


class AttGAN(nn.Module):
  """G = (G_enc, G_dec); also the restorer R."""

  def __init__(self, m, num_attributes: int):
    super().__init__()
    if m.enc_layers != m.dec_layers:
      raise ValueError("the torch reference assumes model.enc_layers == model.dec_layers")
    self.enc = Encoder(m.enc_dim, m.enc_layers, m.max_dim)
    self.dec = Decoder(m.enc_dim, m.dec_dim, m.dec_layers, m.max_dim, num_attributes, m.shortcut_layers,
                       m.inject_layers)

  def forward(self, x, att):
    return self.dec(self.enc(x), att)


class Discriminator(nn.Module):
  """Conv 4x4/2 (no bias) -> InstanceNorm(affine) -> LeakyReLU(0.2) trunk; `fc_adv` (1 logit) and `fc_cls` (A logits) heads."""

  def __init__(self, m, num_attributes: int, image_size: int):
    super().__init__()
    c_in = 3
    widths = _widths(m.dis_dim, m.dis_layers, m.max_dim)
    for i, c in enumerate(widths):
      setattr(self, f"conv_{i}", nn.Conv2d(c_in, c, 4, 2, 1, bias=False))  # InstanceNorm cancels a bias
      setattr(self, f"conv_{i}_norm", nn.InstanceNorm2d(c, eps=1e-5, affine=True))
      c_in = c
    flat = widths[-1] * (image_size // 2**m.dis_layers)**2
    self.fc_adv_0, self.fc_adv_1 = nn.Linear(flat, m.dis_fc_dim), nn.Linear(m.dis_fc_dim, 1)
    self.fc_cls_0, self.fc_cls_1 = nn.Linear(flat, m.dis_fc_dim), nn.Linear(m.dis_fc_dim, num_attributes)
    self.num_layers = m.dis_layers

  def forward(self, x):
    for i in range(self.num_layers):
      x = F.leaky_relu(getattr(self, f"conv_{i}_norm")(getattr(self, f"conv_{i}")(x)), 0.2)
    h = torch.flatten(x, 1)
    return self.fc_adv_1(F.relu(self.fc_adv_0(h)))[:, 0], self.fc_cls_1(F.relu(self.fc_cls_0(h)))


# ---------------------------------------------------------------------------------------------------------------------
# The converter in reverse.


def flax_to_torch_state_dict(module: nn.Module, variables: Mapping[str, Any],
                             module_path: Callable[[str], str] = convert.default_module_path,
                             nchw_dense: Mapping[str, tuple[int, int, int]] | None = None,
                             params_only: bool = False) -> dict[str, torch.Tensor]:
  """Flax variables -> a state dict for `module`, inverting `erasablemask_jax.convert`'s layouts.

  Each torch leaf module at path `a.0.b` reads the Flax module `module_path("a.0.b")` (`a_0/b`):
  Conv2d `(kh, kw, I/g, O) -> (O, I/g, kh, kw)`; ConvTranspose2d with `transpose_kernel=True`, stored as the
  forward conv's HWIO `(kh, kw, out, in)` -> `(in, out, kh, kw)` (the same transpose, no flip); Linear `(in, out) ->
  (out, in)`, with the rows of a Dense that follows an NCHW flatten (`nchw_dense`) permuted back; BatchNorm
  `scale, bias, mean, var -> weight, bias, running_mean, running_var`; affine InstanceNorm `scale, bias`; PReLU
  `negative_slope -> weight`. Every Flax leaf must be used and every torch tensor found.

  Args:
    module: the torch module to fill.
    variables: `{"params": ..., "batch_stats": ...}` (or, with `params_only`, `{"params": ...}`, e.g. gradients).
    module_path: torch module path -> Flax module path.
    nchw_dense: torch Linear paths whose Flax kernel rows are in NHWC-flatten order, with the `(C, H, W)` map.
    params_only: map trainable tensors only (running statistics are neither read nor written).

  Returns:
    `{torch key: tensor}`; load with `module.load_state_dict(sd, strict=not params_only)`.

  Raises:
    KeyError: a torch tensor has no Flax counterpart, or a Flax leaf is left unused (names both sides).
  """
  flat = {k: np.asarray(v) for k, v in convert.flatten_variables(variables).items()}
  used: set[str] = set()
  out: dict[str, torch.Tensor] = {}
  nchw_dense = nchw_dense or {}

  def take(key: str) -> np.ndarray:
    if key not in flat:
      raise KeyError(f"no Flax variable {key!r} for the torch module; nearest: "
                     f"{sorted(k for k in flat if k.rsplit('/', 2)[0] in key)[:4]}")
    used.add(key)
    return flat[key]

  for name, m in module.named_modules():
    path = module_path(name)
    put = lambda leaf, a: out.__setitem__(f"{name}.{leaf}" if name else leaf, torch.from_numpy(np.array(a)))
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
      put("weight", take(f"params/{path}/kernel").transpose(3, 2, 0, 1))
      if m.bias is not None:
        put("bias", take(f"params/{path}/bias"))
    elif isinstance(m, nn.Linear):
      kernel = take(f"params/{path}/kernel")
      if name in nchw_dense:
        c, h, w = nchw_dense[name]
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
      put("weight", kernel.T)
      if m.bias is not None:
        put("bias", take(f"params/{path}/bias"))
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
      put("weight", take(f"params/{path}/scale"))
      put("bias", take(f"params/{path}/bias"))
      if not params_only:
        put("running_mean", take(f"batch_stats/{path}/mean"))
        put("running_var", take(f"batch_stats/{path}/var"))
        put("num_batches_tracked", np.zeros((), np.int64))
    elif isinstance(m, nn.InstanceNorm2d) and m.affine:
      put("weight", take(f"params/{path}/scale"))
      put("bias", take(f"params/{path}/bias"))
    elif isinstance(m, nn.PReLU):
      put("weight", take(f"params/{path}/negative_slope"))
  expected = {k for k, _ in module.named_parameters()} | (set() if params_only else set(module.state_dict()))
  missing = sorted(expected - set(out))
  unused = sorted(set(flat) - used)
  if missing or unused:
    raise KeyError(f"Flax -> torch mapping incomplete: torch tensors without a Flax variable {missing[:8]}; "
                   f"Flax variables left unused {unused[:8]}")
  return out


def load_flax(module: nn.Module, variables: Mapping[str, Any], **kwargs) -> nn.Module:
  """Copies Flax `variables` into `module` (strict) and returns it."""
  module.load_state_dict(flax_to_torch_state_dict(module, variables, **kwargs), strict=True)
  return module


# ---------------------------------------------------------------------------------------------------------------------
# Face recognition surrogates.

_NCHW_DENSE = {"iresnet": {"fc": (512, 7, 7)}, "ir_": {"output_layer.3": (512, 7, 7)}}


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
  """Flax/XLA 'SAME' padding (the extra pixel, if any, at the bottom/right)."""
  pads = []
  for n in (x.shape[3], x.shape[2]):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads += [total // 2, total - total // 2]
  return F.pad(x, pads)


class TinyFR(nn.Module):
  """Torch twin of `benchmarks/tiny_fr.py`'s `TinyFR` (two 3x3/2 SAME convs with ReLU, a Dense on the NHWC flatten)."""

  def __init__(self, size: int, features: int = 8, embedding: int = 16):
    super().__init__()
    self.Conv_0 = nn.Conv2d(3, features, 3, 2)  # pylint: disable=invalid-name (Flax's auto names)
    self.Conv_1 = nn.Conv2d(features, 2 * features, 3, 2)  # pylint: disable=invalid-name
    self.out_hw = -(-(-(-size // 2)) // 2)
    self.Dense_0 = nn.Linear(2 * features * self.out_hw**2, embedding)  # pylint: disable=invalid-name

  def forward(self, x):
    x = F.relu(self.Conv_0(_same_pad(x, 3, 2)))
    x = F.relu(self.Conv_1(_same_pad(x, 3, 2)))
    return self.Dense_0(torch.flatten(x, 1))


def build_fr(arch: str, variables: Mapping[str, Any], input_size: Sequence[int] = (112, 112)) -> nn.Module:
  """The torch reference network of a registered FR `arch` (or `tiny`) holding the Flax `variables` (eval, frozen)."""
  if arch == "tiny":
    model = TinyFR(input_size[0])
    nchw = {"Dense_0": (model.Conv_1.out_channels, model.out_hw, model.out_hw)}
  else:
    model = torch_nets.build(arch)
    nchw = next((v for prefix, v in _NCHW_DENSE.items() if arch.startswith(prefix)), {})
  if arch == "inception_resnet_v1":  # the classifier head is not part of the embedder
    model.logits = nn.Identity()
  load_flax(model, variables, nchw_dense=nchw)
  for p in model.parameters():
    p.requires_grad_(False)
  return model.eval()


def fold_batchnorm(net: nn.Module) -> nn.Module:
  """`net` (eval, frozen) with each BatchNorm that follows a convolution folded into it: torch.fx's own conv-BN fusion
  (`torch.fx.experimental.optimization.fuse`), the twin of `erasablemask_jax.fr.fold` for the "best" formulation."""
  from torch.fx.experimental import optimization  # pylint: disable=g-import-not-at-top

  if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):  # pylint: disable=protected-access
    return net  # nothing to fold (and `TinyFR`'s shape-dependent padding is not fx-traceable)
  folded = optimization.fuse(net)
  for p in folded.parameters():
    p.requires_grad_(False)
  return folded.eval()


class TorchSurrogate(nn.Module):
  """`x in [-1, 1] NCHW -> L2-normalised embedding`: crop, antialiased bilinear resize, mean/std, the network.

  Mirrors `erasablemask_jax.fr.preprocess` (and the `@flip` view of `fr.surrogates`).
  """

  def __init__(self, net: nn.Module, prep: Preprocessing, flip: bool = False):
    super().__init__()
    self.net, self.prep, self.flip = net, prep, flip
    self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32)[None, :, None, None])
    self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32)[None, :, None, None])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.flip:
      x = x.flip(-1)
    fh, fw = self.prep.crop_fraction
    if (fh, fw) != (1.0, 1.0):
      h, w = x.shape[2], x.shape[3]
      ch, cw = int(round(h * fh)), int(round(w * fw))
      top, left = (h - ch) // 2, (w - cw) // 2
      x = x[:, :, top:top + ch, left:left + cw]
    size = tuple(self.prep.input_size)
    if tuple(x.shape[2:]) != size:
      x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = ((x + 1.0) * 0.5 - self.mean) / self.std
    if self.prep.channel_order == "BGR":
      x = x.flip(1)
    e = self.net(x)
    return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(1e-12)
