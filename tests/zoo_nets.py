"""Small nets with the channel couplings of the common model zoos (torchvision, timm), for the maskdecay tests.

Each reproduces one family's pattern at a size a CPU test can afford (``3x32x32`` inputs, a few thousand channels in
all). Plain PyTorch; every factory returns a randomly initialised model in eval mode with non-trivial BN statistics.

===================  ==========================================================================================
name                 pattern
===================  ==========================================================================================
``densenet``         dense concatenation chains: BN over ``torch.cat`` of the stem and every layer, then a 1x1 conv
``csp``              ``x.split`` along channels, a block on one part, ``cat`` back, 1x1 transition (CSPNet)
``res2net``          ``torch.split`` into scales, hierarchical adds between scales, ``cat`` back (Res2Net)
``shufflenet``       ``x.chunk(2, dim=1)``, a branch on one half, ``cat``, channel shuffle (ShuffleNetV2)
``resnext``          grouped 3x3 convs in bottlenecks (ResNeXt, RegNet)
``senet``            squeeze-and-excitation gates (mean, 1x1 convs, sigmoid, multiply)
``attention``        patch embedding, ``qkv`` linear reshaped into heads, attention, projection (ViT)
``convnext``         depthwise conv, permute, LayerNorm over channels, MLP, layer scale (ConvNeXt)
===================  ==========================================================================================
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.nets import finish


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


# ------------------------------------------------------------------------------------------------ DenseNet
class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(x)))


class _DenseBlock(nn.ModuleList):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """Stem, two dense blocks of three layers with a BN-ReLU-1x1 conv-pool transition, BN, classifier."""

    def __init__(self, stem: int = 16, growth: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.conv0, self.norm0 = nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem)
        ch = stem
        self.block1 = _DenseBlock([_DenseLayer(ch + i * growth, growth) for i in range(layers)])
        ch += layers * growth
        self.trans_norm, self.trans_conv = nn.BatchNorm2d(ch), nn.Conv2d(ch, ch // 2, 1, bias=False)
        ch //= 2
        self.block2 = _DenseBlock([_DenseLayer(ch + i * growth, growth) for i in range(layers)])
        ch += layers * growth
        self.norm5, self.fc = nn.BatchNorm2d(ch), nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(F.relu(self.norm0(self.conv0(x))))
        x = self.block2(F.avg_pool2d(self.trans_conv(F.relu(self.trans_norm(x))), 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm5(x)), 1), 1))


# ------------------------------------------------------------------------------------------------ CSPNet
class _CSPStage(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv_exp = _conv_bn(ch, 2 * ch)
        self.blocks = nn.Sequential(_conv_bn(ch, ch, 3), _conv_bn(ch, ch, 3))
        self.conv_transition_b = _conv_bn(ch, ch)
        self.conv_transition = _conv_bn(2 * ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(x)
        xs, xb = x.split(x.shape[1] // 2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb))
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CSPNet(nn.Module):
    def __init__(self, ch: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn(3, ch, 3, 2)
        self.stages = nn.Sequential(_CSPStage(ch), _CSPStage(ch))
        self.fc = nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


# ------------------------------------------------------------------------------------------------ Res2Net
class _Bottle2neck(nn.Module):
    def __init__(self, ch: int, width: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.conv1 = _conv_bn(ch, width * scale)
        self.convs = nn.ModuleList([_conv_bn(width, width, 3) for _ in range(scale - 1)])
        self.conv3 = nn.Conv2d(width * scale, ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv1(x), self.width, 1)
        out, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + spx[i])
            out.append(sp)
        out.append(spx[-1])
        return F.relu(x + self.bn3(self.conv3(torch.cat(out, 1))))


class Res2Net(nn.Module):
    def __init__(self, ch: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn(3, ch, 3, 2)
        self.blocks = nn.Sequential(_Bottle2neck(ch), _Bottle2neck(ch))
        self.fc = nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# ------------------------------------------------------------------------------------------------ ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                         nn.BatchNorm2d(cin), _conv_bn(cin, half))
        self.branch2 = nn.Sequential(
            _conv_bn(cin if stride > 1 else half, half),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half), _conv_bn(half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, ch: int = 16) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, ch, 3)
        self.stage = nn.Sequential(_ShuffleUnit(ch, 2 * ch, 2), _ShuffleUnit(2 * ch, 2 * ch, 1),
                                   _ShuffleUnit(2 * ch, 2 * ch, 1))
        self.conv5 = _conv_bn(2 * ch, 4 * ch)
        self.fc = nn.Linear(4 * ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(self.stage(self.conv1(x))).mean([2, 3]))


# ------------------------------------------------------------------------------------------------ ResNeXt / SE
class _Bottleneck(nn.Module):
    def __init__(self, ch: int, width: int, groups: int, se: bool) -> None:
        super().__init__()
        self.conv1 = _conv_bn(ch, width)
        self.conv2 = _conv_bn(width, width, 3, groups=groups)
        self.se = _SE(width) if se else nn.Identity()
        self.conv3 = nn.Sequential(nn.Conv2d(width, ch, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv3(self.se(self.conv2(self.conv1(x)))))


class _SE(nn.Module):
    """Squeeze-and-excitation as in torchvision's ``SqueezeExcitation``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(ch, ch // 4, 1), nn.Conv2d(ch // 4, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))


class BottleneckNet(nn.Module):
    def __init__(self, ch: int = 32, width: int = 32, groups: int = 1, se: bool = False) -> None:
        super().__init__()
        self.stem = _conv_bn(3, ch, 3, 2)
        self.blocks = nn.Sequential(*[_Bottleneck(ch, width, groups, se) for _ in range(2)])
        self.fc = nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# ------------------------------------------------------------------------------------------------ ViT
class _Attention(nn.Module):
    """timm's ``Attention``: one ``qkv`` linear reshaped into heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))


# ------------------------------------------------------------------------------------------------ ConvNeXt
class _CNBlock(nn.Module):
    """torchvision's ``CNBlock``: dw 7x7, channels-last LayerNorm, MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(F.gelu(self.pwconv1(y))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(_CNBlock(dim), _CNBlock(dim))
        self.fc = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _randomise_ln(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return finish(model)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "densenet": lambda: finish(DenseNet()),
    "csp": lambda: finish(CSPNet()),
    "res2net": lambda: finish(Res2Net()),
    "shufflenet": lambda: finish(ShuffleNet()),
    "resnext": lambda: finish(BottleneckNet(groups=8)),
    "senet": lambda: finish(BottleneckNet(se=True)),
    "attention": lambda: _randomise_ln(ViT()),
    "convnext": lambda: _randomise_ln(ConvNeXt()),
}
"""Short name -> factory. Every net takes ``N x 3 x 32 x 32`` and returns ``N x 10`` logits (classifier ``fc``/``head``)."""


def classifier(model: nn.Module) -> nn.Module:
    """The final linear layer (to pass as ``ignored_layers``)."""
    return model.head if hasattr(model, "head") else model.fc
