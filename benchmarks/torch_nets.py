"""Independent PyTorch reference definitions of the FR zoo with the published state-dict key names.

Used by the parity and conversion tests (`tests/fr`, `tests/convert`) and the PyTorch sides of the benchmarks
(`benchmarks.torch_reference`, `benchmarks.fr_throughput`).

Written from the public architectures (insightface arcface_torch `iresnet.py`, face.evoLVe `model_irse.py`,
facenet-pytorch `inception_resnet_v1.py`, foamliu `mobilefacenet.py`, Xiaoccer `core/model.py`); forward passes
return the raw (unnormalised) embeddings. Needs torch (the `convert` or `bench` extra); tests import it only after
`pytest.importorskip("torch")`.
"""

from __future__ import annotations

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------- arcface_torch IResNet


def conv3x3(i, o, stride=1):
  return nn.Conv2d(i, o, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
    self.conv1 = conv3x3(inplanes, planes)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
    self.prelu = nn.PReLU(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    identity = self.downsample(x) if self.downsample is not None else x
    return out + identity


class IResNet(nn.Module):

  def __init__(self, layers, num_features=512):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
    self.prelu = nn.PReLU(64)
    self.layer1 = self._make_layer(64, layers[0], 2)
    self.layer2 = self._make_layer(128, layers[1], 2)
    self.layer3 = self._make_layer(256, layers[2], 2)
    self.layer4 = self._make_layer(512, layers[3], 2)
    self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
    self.dropout = nn.Dropout(p=0.0)
    self.fc = nn.Linear(512 * 7 * 7, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=1e-05)

  def _make_layer(self, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes, eps=1e-05))
    layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes
    layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(self.bn2(x), 1)
    return self.features(self.fc(self.dropout(x)))


# --------------------------------------------------------------------------------------------- face.evoLVe IR / IR-SE


class SEModule(nn.Module):

  def __init__(self, channels, reduction):
    super().__init__()
    self.avg_pool = nn.AdaptiveAvgPool2d(1)
    self.fc1 = nn.Conv2d(channels, channels // reduction, 1, padding=0, bias=False)
    self.relu = nn.ReLU(inplace=True)
    self.fc2 = nn.Conv2d(channels // reduction, channels, 1, padding=0, bias=False)
    self.sigmoid = nn.Sigmoid()

  def forward(self, x):
    return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIR(nn.Module):

  def __init__(self, in_channel, depth, stride, se=False):
    super().__init__()
    if in_channel == depth:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False),
                                          nn.BatchNorm2d(depth))
    mods = [nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False), nn.BatchNorm2d(depth)]
    if se:
      mods.append(SEModule(depth, 16))
    self.res_layer = nn.Sequential(*mods)

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


class Flatten(nn.Module):

  def forward(self, x):
    return x.view(x.size(0), -1)


IR_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}


class IRBackbone(nn.Module):

  def __init__(self, num_layers, mode="ir"):
    super().__init__()
    self.input_layer = nn.Sequential(nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
    self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(), Flatten(), nn.Linear(512 * 7 * 7, 512),
                                      nn.BatchNorm1d(512))
    modules, in_channel = [], 64
    for depth, n in zip((64, 128, 256, 512), IR_UNITS[num_layers]):
      for i in range(n):
        modules.append(BottleneckIR(in_channel, depth, 2 if i == 0 else 1, se=(mode == "ir_se")))
        in_channel = depth
    self.body = nn.Sequential(*modules)

  def forward(self, x):
    return self.output_layer(self.body(self.input_layer(x)))


# -------------------------------------------------------------------------------------- facenet-pytorch InceptionResnetV1


class BasicConv2d(nn.Module):

  def __init__(self, in_planes, out_planes, kernel_size, stride, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, bias=False)
    self.bn = nn.BatchNorm2d(out_planes, eps=0.001, momentum=0.1, affine=True)
    self.relu = nn.ReLU(inplace=False)

  def forward(self, x):
    return self.relu(self.bn(self.conv(x)))


class Block35(nn.Module):

  def __init__(self, scale=1.0):
    super().__init__()
    self.scale = scale
    self.branch0 = BasicConv2d(256, 32, 1, 1)
    self.branch1 = nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1))
    self.branch2 = nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1),
                                 BasicConv2d(32, 32, 3, 1, 1))
    self.conv2d = nn.Conv2d(96, 256, 1, 1)
    self.relu = nn.ReLU(inplace=False)

  def forward(self, x):
    out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1))
    return self.relu(out * self.scale + x)


class Block17(nn.Module):

  def __init__(self, scale=1.0):
    super().__init__()
    self.scale = scale
    self.branch0 = BasicConv2d(896, 128, 1, 1)
    self.branch1 = nn.Sequential(BasicConv2d(896, 128, 1, 1), BasicConv2d(128, 128, (1, 7), 1, (0, 3)),
                                 BasicConv2d(128, 128, (7, 1), 1, (3, 0)))
    self.conv2d = nn.Conv2d(256, 896, 1, 1)
    self.relu = nn.ReLU(inplace=False)

  def forward(self, x):
    out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))
    return self.relu(out * self.scale + x)


class Block8(nn.Module):

  def __init__(self, scale=1.0, noReLU=False):
    super().__init__()
    self.scale, self.noReLU = scale, noReLU
    self.branch0 = BasicConv2d(1792, 192, 1, 1)
    self.branch1 = nn.Sequential(BasicConv2d(1792, 192, 1, 1), BasicConv2d(192, 192, (1, 3), 1, (0, 1)),
                                 BasicConv2d(192, 192, (3, 1), 1, (1, 0)))
    self.conv2d = nn.Conv2d(384, 1792, 1, 1)
    if not noReLU:
      self.relu = nn.ReLU(inplace=False)

  def forward(self, x):
    out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1)) * self.scale + x
    return out if self.noReLU else self.relu(out)


class Mixed6a(nn.Module):

  def __init__(self):
    super().__init__()
    self.branch0 = BasicConv2d(256, 384, 3, 2)
    self.branch1 = nn.Sequential(BasicConv2d(256, 192, 1, 1), BasicConv2d(192, 192, 3, 1, 1),
                                 BasicConv2d(192, 256, 3, 2))
    self.branch2 = nn.MaxPool2d(3, stride=2)

  def forward(self, x):
    return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Mixed7a(nn.Module):

  def __init__(self):
    super().__init__()
    self.branch0 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 384, 3, 2))
    self.branch1 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 2))
    self.branch2 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 1, 1),
                                 BasicConv2d(256, 256, 3, 2))
    self.branch3 = nn.MaxPool2d(3, stride=2)

  def forward(self, x):
    return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionResnetV1(nn.Module):

  def __init__(self, num_classes=None):
    super().__init__()
    self.conv2d_1a = BasicConv2d(3, 32, 3, 2)
    self.conv2d_2a = BasicConv2d(32, 32, 3, 1)
    self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1)
    self.maxpool_3a = nn.MaxPool2d(3, stride=2)
    self.conv2d_3b = BasicConv2d(64, 80, 1, 1)
    self.conv2d_4a = BasicConv2d(80, 192, 3, 1)
    self.conv2d_4b = BasicConv2d(192, 256, 3, 2)
    self.repeat_1 = nn.Sequential(*[Block35(scale=0.17) for _ in range(5)])
    self.mixed_6a = Mixed6a()
    self.repeat_2 = nn.Sequential(*[Block17(scale=0.10) for _ in range(10)])
    self.mixed_7a = Mixed7a()
    self.repeat_3 = nn.Sequential(*[Block8(scale=0.20) for _ in range(5)])
    self.block8 = Block8(noReLU=True)
    self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
    self.dropout = nn.Dropout(0.6)
    self.last_linear = nn.Linear(1792, 512, bias=False)
    self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1, affine=True)
    if num_classes:
      self.logits = nn.Linear(512, num_classes)

  def forward(self, x):
    for m in (self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b, self.conv2d_4a,
              self.conv2d_4b, self.repeat_1, self.mixed_6a, self.repeat_2, self.mixed_7a, self.repeat_3, self.block8):
      x = m(x)
    x = self.dropout(self.avgpool_1a(x))
    return self.last_bn(self.last_linear(x.view(x.shape[0], -1)))


# ------------------------------------------------------------------------------------------------ foamliu MobileFaceNet

SETTING = [[2, 64, 5, 2], [4, 128, 1, 2], [2, 128, 6, 1], [4, 128, 1, 2], [2, 128, 2, 1]]


class ConvBNReLU(nn.Sequential):

  def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
    padding = (kernel_size - 1) // 2
    super().__init__(nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
                     nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


class DepthwiseSeparableConv(nn.Module):

  def __init__(self, in_planes, out_planes, kernel_size, padding):
    super().__init__()
    self.depthwise = nn.Conv2d(in_planes, in_planes, kernel_size, padding=padding, groups=in_planes, bias=False)
    self.pointwise = nn.Conv2d(in_planes, out_planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu = nn.ReLU()

  def forward(self, x):
    return self.relu(self.bn2(self.pointwise(self.relu(self.bn1(self.depthwise(x))))))


class GDConv(nn.Module):

  def __init__(self, in_planes, out_planes, kernel_size, padding):
    super().__init__()
    self.depthwise = nn.Conv2d(in_planes, out_planes, kernel_size, padding=padding, groups=in_planes, bias=False)
    self.bn = nn.BatchNorm2d(in_planes)

  def forward(self, x):
    return self.bn(self.depthwise(x))


class InvertedResidual(nn.Module):

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers = [ConvBNReLU(inp, hidden, kernel_size=1)] if expand_ratio != 1 else []
    layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
               nn.BatchNorm2d(oup)]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileFaceNetFoamliu(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = ConvBNReLU(3, 64, stride=2)
    self.dw_conv = DepthwiseSeparableConv(64, 64, 3, 1)
    features, c_in = [], 64
    for t, c, n, s in SETTING:
      for i in range(n):
        features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
        c_in = c
    self.conv2 = ConvBNReLU(c_in, 512, kernel_size=1)
    self.gdconv = GDConv(512, 512, 7, 0)
    self.conv3 = nn.Conv2d(512, 128, 1)
    self.bn = nn.BatchNorm2d(128)
    self.features = nn.Sequential(*features)

  def forward(self, x):
    x = self.conv2(self.features(self.dw_conv(self.conv1(x))))
    x = self.bn(self.conv3(self.gdconv(x)))
    return x.view(x.size(0), -1)


# ----------------------------------------------------------------------------------------------- Xiaoccer MobileFacenet


class Bottleneck(nn.Module):

  def __init__(self, inp, oup, stride, expansion):
    super().__init__()
    self.connect = stride == 1 and inp == oup
    h = inp * expansion
    self.conv = nn.Sequential(nn.Conv2d(inp, h, 1, 1, 0, bias=False), nn.BatchNorm2d(h), nn.PReLU(h),
                              nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.PReLU(h),
                              nn.Conv2d(h, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

  def forward(self, x):
    return x + self.conv(x) if self.connect else self.conv(x)


class ConvBlock(nn.Module):

  def __init__(self, inp, oup, k, s, p, dw=False, linear=False):
    super().__init__()
    self.linear = linear
    self.conv = nn.Conv2d(inp, oup, k, s, p, groups=inp if dw else 1, bias=False)
    self.bn = nn.BatchNorm2d(oup)
    if not linear:
      self.prelu = nn.PReLU(oup)

  def forward(self, x):
    x = self.bn(self.conv(x))
    return x if self.linear else self.prelu(x)


class MobileFacenetSphereFace(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = ConvBlock(3, 64, 3, 2, 1)
    self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, dw=True)
    layers, c_in = [], 64
    for t, c, n, s in SETTING:
      for i in range(n):
        layers.append(Bottleneck(c_in, c, s if i == 0 else 1, t))
        c_in = c
    self.blocks = nn.Sequential(*layers)
    self.conv2 = ConvBlock(128, 512, 1, 1, 0)
    self.linear7 = ConvBlock(512, 512, (7, 6), 1, 0, dw=True, linear=True)
    self.linear1 = ConvBlock(512, 128, 1, 1, 0, linear=True)

  def forward(self, x):
    x = self.linear1(self.linear7(self.conv2(self.blocks(self.dw_conv1(self.conv1(x))))))
    return x.view(x.size(0), -1)


# ------------------------------------------------------------------------------------------------------------- helpers


def build(arch: str) -> nn.Module:
  """The reference module for a registered architecture name, in eval mode."""
  if arch.startswith("iresnet"):
    layers = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}
    model = IResNet(layers[int(arch[len("iresnet"):])])
  elif arch.startswith("ir_se_"):
    model = IRBackbone(int(arch[len("ir_se_"):]), "ir_se")
  elif arch.startswith("ir_"):
    model = IRBackbone(int(arch[len("ir_"):]), "ir")
  elif arch == "inception_resnet_v1":
    model = InceptionResnetV1(num_classes=10)
  elif arch == "mobilefacenet":
    model = MobileFaceNetFoamliu()
  elif arch == "mobilefacenet_sphereface":
    model = MobileFacenetSphereFace()
  else:
    raise KeyError(arch)
  return model.eval()


@torch.no_grad()
def randomise(model: nn.Module, seed: int, input_shape: tuple[int, int, int]) -> nn.Module:
  """Random weights, PReLU slopes and BatchNorm affine terms, and non-trivial BatchNorm running statistics.

  The running statistics are first measured on a random batch (so activations of deep variants stay O(1)), then
  perturbed: `var *= U(0.5, 1.5)`, `mean += 0.1 * N(0, 1) * sqrt(var)`.
  """
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
  for m in model.modules():
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
      m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
      m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    elif isinstance(m, nn.PReLU):
      m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.05)
    elif isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      if m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
  model.eval()
  for m in bns:
    m.reset_running_stats()
    m.momentum = None  # cumulative average: after one batch, the running stats are that batch's statistics.
    m.train()
  h, w, c = input_shape
  model(torch.rand((2, c, h, w), generator=g) * 2 - 1)
  model.eval()
  for m in bns:
    m.momentum = 0.1
    var = m.running_var * (torch.rand(m.num_features, generator=g) + 0.5)
    m.running_mean.add_(0.1 * torch.randn(m.num_features, generator=g) * var.sqrt())
    m.running_var.copy_(var)
    m.num_batches_tracked.fill_(7)
  return model


def state_dict_numpy(model: nn.Module) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
