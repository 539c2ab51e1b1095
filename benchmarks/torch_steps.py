"""The stage-2 meta-auxiliary training step in PyTorch eager, as a PyTorch implementation of the paper would write it.

Same networks as `erasablemask_jax.models` (AttGAN encoder / decoder with clean-branch injection, E_adv, R, D with
InstanceNorm and two FC heads), the same FR surrogates (the torch definitions of `benchmarks/torch_nets.py`),
the same losses (Eq. 3-13) and the same weights: `flax_to_torch_state_dict` is the converter in reverse.

The step (Eq. 15, Algorithm 1), with theta = E_adv's parameters, G frozen, x_adv = G_dec(fuse(G_enc(x), E_adv(x)),
att_b) computed once with its autograd graph:

  D:   L_D + l_att_d L_att^D on (x, x_adv.detach()), one Adam step;
  E,R: l_att L_att^G + l_G L_G + l_perb L_perb + l_era L_era + l_adv L_adv against the updated D, where
       L_adv = max(sum_p [l_p(x_adv) + sum_{q != p} w_q l_q(G(theta - lr grad l_p)) / (K-1)] / (2K), epsilon)
       with the inner gradient taken by `torch.autograd.grad(..., create_graph=True)` (second order; detached for
       first order) and one `backward()` of the total; one Adam step each for E_adv and R.

`TorchStage2` is the naive formulation (create_graph=True); `TorchStage2Best` our algorithm through torch.func.
The equality check against JAX and its command: `benchmarks/torch_reference.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_attgan import AttGAN, Discriminator, Encoder, TorchSurrogate, lerp, load_flax, tile

# ---------------------------------------------------------------------------------------------------------------------
# Losses (erasablemask_jax.losses) and the step.


def _bce(logits, labels):
  return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def _sigma1(w, image_size: int) -> float:
  """SPEC.md, Eq. 8: sigma1 is the hinge at `sigma1_reference_size` (256) and scales with the side, the same per-pixel
  budget at every resolution; a reference size of 0 (runs saved before the rule) keeps it as written."""
  reference = getattr(w, "sigma1_reference_size", 0)
  return w.sigma1 * image_size / reference if reference else w.sigma1


def _l2_per_image(a, b):
  return torch.linalg.vector_norm((a - b).flatten(1), dim=1)


class TorchStage2:
  """One stage-2 step of ErasableMask in PyTorch eager; networks, optimisers and attack settings held.

  Attributes:
    g, e_adv, r, d: the networks (G frozen, eval mode; E_adv and R train mode; D).
    surrogates: the K `TorchSurrogate`s; targets: their (D,) target embeddings.
    last_grads: after `step`, `{"d": ..., "e_adv": ..., "r": ...}` with each parameter's gradient.
  """

  def __init__(self, model_config, loss_config, optim_config, num_attributes: int, image_size: int,
               variables: Mapping[str, Mapping[str, Any]], surrogates: Sequence[TorchSurrogate],
               targets: Sequence[np.ndarray], w: np.ndarray, *, kind: str = "meta_auxiliary", lr_inner: float = 2e-5):
    if kind not in ("meta_auxiliary", "first_order", "ensemble"):
      raise ValueError(f"unknown attack kind {kind!r}")
    m = model_config
    self.g = load_flax(AttGAN(m, num_attributes), variables["g"]).eval()
    self.e_adv = load_flax(Encoder(m.enc_dim, m.enc_layers, m.max_dim), variables["e_adv"]).train()
    self.r = load_flax(AttGAN(m, num_attributes), variables["r"]).train()
    self.d = load_flax(Discriminator(m, num_attributes, image_size), variables["d"]).train()
    for p in self.g.parameters():
      p.requires_grad_(False)
    self.surrogates = list(surrogates)
    self.targets = [torch.tensor(np.asarray(t), dtype=torch.float32) for t in targets]
    self.w = torch.as_tensor(np.asarray(w), dtype=torch.float32)
    self.beta, self.gamma, self.thres_int = m.beta, m.gamma, m.thres_int
    self.loss, self.kind, self.lr_inner = loss_config, kind, lr_inner
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=optim_config.lr, betas=(optim_config.b1, optim_config.b2),
                                        eps=1e-8)
    self.opt = {"d": adam(self.d), "e_adv": adam(self.e_adv), "r": adam(self.r)}
    self.last_grads: dict[str, dict[str, torch.Tensor]] = {}
    self.device = torch.device("cpu")

  def place(self, device: str, memory_format: torch.memory_format = torch.preserve_format,
            fr_dtype: torch.dtype | None = None) -> None:
    """Moves every network, target and weight to `device` (parameters in place, so the optimisers stay valid)."""
    self.device = torch.device(device)
    for name in ("g", "e_adv", "r", "d"):
      getattr(self, name).to(device=self.device, memory_format=memory_format)
    self.surrogates = [s.to(device=self.device, dtype=fr_dtype, memory_format=memory_format) for s in self.surrogates]
    self.targets = [t.to(self.device) for t in self.targets]
    self.w = self.w.to(self.device)

  def prepare(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the step's device (outside the timed step)."""
    return {k: v.to(self.device) for k, v in batch.items()}

  def synchronize(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def code(self, att: torch.Tensor) -> torch.Tensor:
    return (2.0 * att - 1.0) * self.thres_int

  def protect(self, theta: Mapping[str, torch.Tensor], x, code_b, ft):
    """Eq. 6-7: `(x_adv, x_edit)` for E_adv parameters `theta` (a functional call; batch statistics)."""
    perb = torch.func.functional_call(self.e_adv, dict(theta), (x,))
    fs = [lerp(p, f, self.beta) for f, p in zip(ft, perb)]
    return self.g.dec(fs, code_b, clean_zs=ft, gamma=self.gamma)

  def fr_loss(self, k: int, x: torch.Tensor) -> torch.Tensor:
    """Eq. 9's `1 - mean_b cos(FR_k(x), t_k)`."""
    return 1.0 - torch.mean(self.surrogates[k](x) @ self.targets[k])

  def adversarial_loss(self, theta, x_adv, x, code_b, ft):
    """L_adv (Eq. 12) with the inner step of Eq. 10 differentiated by `create_graph=True`; also each L_pri_k."""
    num = len(self.surrogates)
    l_pri = [self.fr_loss(k, x_adv) for k in range(num)]
    if self.kind == "ensemble":
      total = torch.stack(l_pri).mean()
    else:
      names, params = list(theta), list(theta.values())
      total = 0.0
      for p in range(num):
        grads = torch.autograd.grad(l_pri[p], params, create_graph=self.kind == "meta_auxiliary", retain_graph=True)
        theta_p = {n: t - self.lr_inner * (g if self.kind == "meta_auxiliary" else g.detach())
                   for n, t, g in zip(names, params, grads)}
        x_p, _ = self.protect(theta_p, x, code_b, ft)
        aux = sum(self.w[q] * self.fr_loss(q, x_p) for q in range(num) if q != p) / (num - 1)
        total = total + l_pri[p] + aux
      total = total / (2 * num)
    eps = torch.as_tensor(self.loss.epsilon, dtype=total.dtype, device=total.device)
    return torch.where(total > eps, total, eps), torch.stack(l_pri).detach()

  def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """One step on `{"image": (B, 3, H, W) in [-1, 1], "att_a", "att_b": (B, A)}`; returns the metrics."""
    x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
    w = self.loss
    code_a, code_b = self.code(att_a), self.code(att_b)
    theta = dict(self.e_adv.named_parameters())
    with torch.no_grad():
      ft = self.g.enc(x)
    x_adv, x_edit = self.protect(theta, x, code_b, ft)

    # D: L_D + l_att_d L_att^D on real and (detached) protected images.
    real_logit, real_att = self.d(x)
    fake_logit, _ = self.d(x_adv.detach())
    l_d = torch.mean(_bce(real_logit, torch.ones_like(real_logit)) + _bce(fake_logit, torch.zeros_like(fake_logit)))
    l_att_d = torch.mean(_bce(real_att, att_a))
    d_total = l_d + w.l_att_d * l_att_d
    self.opt["d"].zero_grad(set_to_none=True)
    d_total.backward()
    self.last_grads["d"] = {n: p.grad.detach().clone() for n, p in self.d.named_parameters()}
    self.opt["d"].step()

    # E_adv and R against the updated D.
    for p in self.d.parameters():
      p.requires_grad_(False)
    logit, att_logits = self.d(x_adv)
    x_rec = self.r(x_adv, code_a)
    terms = {
        "att": torch.mean(_bce(att_logits, att_b)),
        "g": torch.mean(_bce(logit, torch.ones_like(logit))),
        "perb": torch.mean(torch.clamp(_l2_per_image(x_adv, x_edit), min=_sigma1(w, x.shape[-1]))),
        "era": torch.mean(_l2_per_image(x_rec, x)),
    }
    l_pri = None
    if self.surrogates:
      terms["adv"], l_pri = self.adversarial_loss(theta, x_adv, x, code_b, ft)
    total = sum(getattr(w, f"l_{k}") * v for k, v in terms.items())
    self.opt["e_adv"].zero_grad(set_to_none=True)
    self.opt["r"].zero_grad(set_to_none=True)
    total.backward()
    for p in self.d.parameters():
      p.requires_grad_(True)
    for name in ("e_adv", "r"):
      self.last_grads[name] = {n: p.grad.detach().clone() for n, p in getattr(self, name).named_parameters()}
      self.opt[name].step()

    with torch.no_grad():
      rec = torch.mean(torch.abs(self.g(x, code_a) - x))
    metrics = {"d/adv": l_d, "d/att": l_att_d, "d/total": d_total, **{f"e/{k}": v for k, v in terms.items()},
               "e/total": total, "e/rec": rec}
    if l_pri is not None:
      for k in range(len(self.surrogates)):
        metrics[f"fr/{k}/cos"] = 1.0 - l_pri[k]
    return {k: float(v.detach()) for k, v in metrics.items()}


class TorchStage2Best(TorchStage2):
  """The same stage-2 step as the JAX one, written as a PyTorch performance engineer would (`--compare-torch`'s
  "torch best").

  The algorithm is ours, not the naive reference's: the meta-gradient is assembled from first-order pieces and one
  forward-over-reverse Hessian-vector product per primary (`torch.func.jvp` of `torch.func.grad`, as
  `erasablemask_jax.attack.meta_auxiliary` does with `jax.jvp` of `jax.grad`):

    grad L_adv = [sum_p g_p + a_p - lr H_p a_p] / (2K)   (masked by the hinge of Eq. 12),

  with g_p = grad l_p(G(theta)) from the one x_adv graph, a_p = grad of the auxiliary loss at theta - lr g_p and
  H_p a_p = jvp(grad l_p(G(.)), theta, a_p). The rest of E's loss is one `backward()` through that x_adv graph, and
  l_adv * grad L_adv is added to E_adv's `.grad` in place.

  Beyond the algorithm: theta-independent work is done once per step (G_enc(x), the whole clean branch of G_dec and
  with it x_edit, and the e/rec metric reuses G_enc(x)); every network and image is `channels_last`; Adam is
  `torch.optim.Adam(fused=True)` (foreach where fused is unavailable); E_adv inside the attack is a pure function
  (`F.batch_norm` without running statistics, so the transforms capture no buffers and only the outer x_adv updates
  E_adv's statistics, as in JAX); the step returns tensors (no `float()` synchronisation, no gradient copies:
  `last_grads` holds references to the `.grad` tensors, valid until the next step). `dtype` runs the FR surrogates,
  D and R in that dtype (the frozen FR weights cast once; D and R under `torch.autocast`, float32 parameters and
  Adam), while E_adv, G and the inner step stay float32.
  """

  def __init__(self, *args, device: str = "cpu", dtype: torch.dtype = torch.float32, **kwargs):
    super().__init__(*args, **kwargs)
    self.dtype = dtype
    self.place(device, torch.channels_last, dtype)
    m = self.opt["d"].defaults
    self.opt = {name: self._adam(getattr(self, name), m) for name in ("d", "e_adv", "r")}

  def _adam(self, net: nn.Module, defaults: Mapping[str, Any]) -> torch.optim.Optimizer:
    kwargs = dict(lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"])
    try:
      return torch.optim.Adam(net.parameters(), fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused not supported for this device/dtype
      return torch.optim.Adam(net.parameters(), foreach=True, **kwargs)

  @property
  def adam_kind(self) -> str:
    return "fused" if self.opt["e_adv"].defaults.get("fused") else "foreach"

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

  def prepare(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the device, images `channels_last` (outside the timed step)."""
    return {"image": batch["image"].to(self.device).contiguous(memory_format=torch.channels_last),
            "att_a": batch["att_a"].to(self.device), "att_b": batch["att_b"].to(self.device)}

  # ---------------------------------------------------------------------------------------------------------------
  # G(theta) as a pure function, with the theta-independent parts precomputed.

  def _perturb(self, theta: Mapping[str, torch.Tensor], x: torch.Tensor, track: bool) -> list[torch.Tensor]:
    """E_adv(x) with parameters `theta` on batch statistics; `track` also updates E_adv's running statistics."""
    enc, out = self.e_adv, []
    for i in range(enc.num_layers):
      bn = getattr(enc, f"enc_layers_{i}_bn")
      x = F.conv2d(x, theta[f"enc_layers_{i}_conv.weight"], stride=2, padding=1)
      x = F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                       theta[f"enc_layers_{i}_bn.weight"], theta[f"enc_layers_{i}_bn.bias"], training=True,
                       momentum=bn.momentum, eps=bn.eps)
      x = F.leaky_relu(x, 0.2)
      out.append(x)
    return out

  def _fixed(self, x: torch.Tensor, code_b: torch.Tensor) -> dict[str, Any]:
    """Everything of G(theta) that does not depend on theta: G_enc(x), each clean-branch layer output, the attribute
    tiles each concatenation needs (channels_last)."""
    dec = self.g.dec
    ft = self.g.enc(x)
    tiles = {}

    def concat(i, h, zs):
      if i < dec.shortcut_layers:
        h = torch.cat([h, zs[dec.num_layers - 2 - i]], dim=1)
      if i < dec.inject_layers:
        size = h.shape[2]
        if size not in tiles:
          tiles[size] = tile(code_b, size).contiguous(memory_format=torch.channels_last)
        h = torch.cat([h, tiles[size]], dim=1)
      return h

    size = ft[-1].shape[2]
    tiles[size] = tile(code_b, size).contiguous(memory_format=torch.channels_last)
    c = torch.cat([ft[-1], tiles[size]], dim=1)
    clean = []
    for i in range(dec.num_layers):
      c = dec._layer(i, c)  # pylint: disable=protected-access
      clean.append(c)
      if i < dec.num_layers - 1:
        c = concat(i, c, ft)
    return {"ft": ft, "clean": clean, "tiles": tiles}

  def generate(self, theta: Mapping[str, torch.Tensor], x: torch.Tensor, fixed: Mapping[str, Any],
               track: bool = False) -> torch.Tensor:
    """x_adv = G_dec(fuse(G_enc(x), E_adv(x; theta)), att_b) with the clean branch read from `fixed`."""
    dec, ft, clean, tiles = self.g.dec, fixed["ft"], fixed["clean"], fixed["tiles"]
    fs = [lerp(p, f, self.beta) for f, p in zip(ft, self._perturb(theta, x, track))]
    h = torch.cat([fs[-1], tiles[fs[-1].shape[2]]], dim=1)
    for i in range(dec.num_layers):
      h = lerp(dec._layer(i, h), clean[i], self.gamma)  # pylint: disable=protected-access
      if i < dec.num_layers - 1:
        if i < dec.shortcut_layers:
          h = torch.cat([h, fs[dec.num_layers - 2 - i]], dim=1)
        if i < dec.inject_layers:
          h = torch.cat([h, tiles[h.shape[2]]], dim=1)
    return h

  def fr_loss(self, k: int, x: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.mean(self.surrogates[k](x.to(self.dtype)).float() @ self.targets[k])

  # ---------------------------------------------------------------------------------------------------------------

  def attack_grad(self, theta, x_adv, x, fixed) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`(L_adv, l_pri (K,), grad of L_adv w.r.t. theta)` by the first-order pieces and one HVP per primary."""
    num = len(self.surrogates)
    names, params = list(theta), list(theta.values())
    flat = dict(zip(names, (t.detach() for t in params)))
    l_pri = [self.fr_loss(k, x_adv) for k in range(num)]
    if self.kind == "ensemble":
      total = torch.stack(l_pri).mean()
      grads = torch.autograd.grad(total, params, retain_graph=True)
      grad = dict(zip(names, grads))
    else:
      grad = None
      for p in range(num):
        g_p = dict(zip(names, torch.autograd.grad(l_pri[p], params, retain_graph=True)))
        theta_p = {n: flat[n] - self.lr_inner * g_p[n] for n in names}

        def aux(t, p=p):
          x_p = self.generate(t, x, fixed)
          return sum(self.w[q] * self.fr_loss(q, x_p) for q in range(num) if q != p) / (num - 1)

        a_p, l_aux = torch.func.grad_and_value(aux)(theta_p)
        step = {n: g_p[n] + a_p[n] for n in names}
        if self.kind == "meta_auxiliary":
          inner = torch.func.grad(lambda t, p=p: self.fr_loss(p, self.generate(t, x, fixed)))
          _, hvp = torch.func.jvp(inner, (flat,), (a_p,))
          for n in names:
            step[n].sub_(hvp[n], alpha=self.lr_inner)
        if grad is None:
          grad = step
        else:
          for n in names:
            grad[n].add_(step[n])
        total = l_aux if p == 0 else total + l_aux
      total = (torch.stack(l_pri).sum() + total) / (2 * num)
      for n in names:
        grad[n].div_(2 * num)
    eps = torch.as_tensor(self.loss.epsilon, dtype=total.dtype, device=total.device)
    active = total > eps
    for n in names:
      grad[n].mul_(active)
    return torch.where(active, total, eps).detach(), torch.stack(l_pri).detach(), grad

  def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One step on a `prepare`d batch; returns the metrics as (device) tensors."""
    x, att_a, att_b = batch["image"], batch["att_a"], batch["att_b"]
    w = self.loss
    code_a, code_b = self.code(att_a), self.code(att_b)
    theta = dict(self.e_adv.named_parameters())
    with torch.no_grad():
      fixed = self._fixed(x, code_b)
      x_edit = fixed["clean"][-1]
      rec = torch.mean(torch.abs(self.g.dec(fixed["ft"], code_a) - x))
    x_adv = self.generate(theta, x, fixed, track=True)
    with self._autocast():
      real_logit, real_att = self.d(x)
      fake_logit, _ = self.d(x_adv.detach())
    real_logit, real_att, fake_logit = real_logit.float(), real_att.float(), fake_logit.float()
    l_d = torch.mean(_bce(real_logit, torch.ones_like(real_logit)) + _bce(fake_logit, torch.zeros_like(fake_logit)))
    l_att_d = torch.mean(_bce(real_att, att_a))
    d_total = l_d + w.l_att_d * l_att_d
    self.opt["d"].zero_grad(set_to_none=True)
    d_total.backward()
    self.opt["d"].step()

    for p in self.d.parameters():
      p.requires_grad_(False)
    with self._autocast():
      logit, att_logits = self.d(x_adv)
      x_rec = self.r(x_adv, code_a)
    x_rec = x_rec.float()
    terms = {
        "att": torch.mean(_bce(att_logits.float(), att_b)),
        "g": torch.mean(_bce(logit.float(), torch.ones_like(logit, dtype=torch.float32))),
        "perb": torch.mean(torch.clamp(_l2_per_image(x_adv, x_edit), min=_sigma1(w, x.shape[-1]))),
        "era": torch.mean(_l2_per_image(x_rec, x)),
    }
    l_pri, attack_grad = None, None
    if self.surrogates:
      terms["adv"], l_pri, attack_grad = self.attack_grad(theta, x_adv, x, fixed)
    rest = sum(getattr(w, f"l_{k}") * v for k, v in terms.items() if k != "adv")
    total = rest + (w.l_adv * terms["adv"] if "adv" in terms else 0.0)
    self.opt["e_adv"].zero_grad(set_to_none=True)
    self.opt["r"].zero_grad(set_to_none=True)
    rest.backward()
    for p in self.d.parameters():
      p.requires_grad_(True)
    if attack_grad is not None:
      for n, p in theta.items():
        p.grad.add_(attack_grad[n], alpha=w.l_adv)
    for name in ("d", "e_adv", "r"):
      self.last_grads[name] = {n: p.grad for n, p in getattr(self, name).named_parameters()}
    self.opt["e_adv"].step()
    self.opt["r"].step()

    metrics = {"d/adv": l_d, "d/att": l_att_d, "d/total": d_total, **{f"e/{k}": v for k, v in terms.items()},
               "e/total": total, "e/rec": rec}
    if l_pri is not None:
      for k in range(len(self.surrogates)):
        metrics[f"fr/{k}/cos"] = 1.0 - l_pri[k]
    return {k: v.detach() for k, v in metrics.items()}
