"""Building blocks of the EVC image codec.

Written from the architecture facts in ``shared/reference/evc_official.md`` (sections 1.2-1.5). Module and attribute
names are chosen so that the state-dict keys match the official checkpoints (e.g. ``enc.1.block.0.conv1.0.weight``).

Two families of "DepthConv" blocks exist, exactly as in the official code:

* the *transform* flavour (:class:`DepthConv`, :class:`ConvFFN`, :class:`DepthConvBlock`), used in the analysis and
  synthesis transforms: every conv is followed by a LeakyReLU/ReLU and the FFN is 4x wide;
* the *prior* flavour (:class:`PriorDepthConv`, :class:`PriorConvFFN`, :class:`PriorDepthConvBlock`,
  :class:`PriorDepthConvBlockUpsample`), used in the hyper encoder/decoder, the prior fusion and the spatial prior:
  depthwise and output convs are bare, and the FFN hidden width is ``max(min(4c, 1024), 2c)``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "conv1x1",
    "conv3x3",
    "ResidualBlockWithStride",
    "ResidualBlockUpsample",
    "DepthConv",
    "ConvFFN",
    "DepthConvBlock",
    "PriorDepthConv",
    "PriorConvFFN",
    "PriorDepthConvBlock",
    "PriorDepthConvBlockUpsample",
    "prior_ffn_hidden",
]


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with bias."""
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 'same' convolution with bias."""
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, groups=groups)


class ResidualBlockWithStride(nn.Module):
    """3x3/s2 conv, LeakyReLU(0.01), 3x3 conv, LeakyReLU(0.1), plus a 1x1/s2 skip. No activation after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride=stride)
        self.leaky_relu = nn.LeakyReLU(0.01)
        self.conv2 = conv3x3(cout, cout)
        self.leaky_relu2 = nn.LeakyReLU(0.1)
        self.downsample = conv1x1(cin, cout, stride=stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu2(self.conv2(self.leaky_relu(self.conv1(x))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class ResidualBlockUpsample(nn.Module):
    """x2 upsampling: main path 1x1 conv + PixelShuffle + LeakyReLU(0.01) + 3x3 conv + LeakyReLU(0.1);
    skip path 1x1 conv + PixelShuffle; the two are added."""

    def __init__(self, cin: int, cout: int, upsample: int = 2) -> None:
        super().__init__()
        self.subpel_conv = nn.Sequential(conv1x1(cin, cout * upsample**2), nn.PixelShuffle(upsample))
        self.leaky_relu = nn.LeakyReLU(0.01)
        self.conv = conv3x3(cout, cout)
        self.leaky_relu2 = nn.LeakyReLU(0.1)
        self.upsample = nn.Sequential(conv1x1(cin, cout * upsample**2), nn.PixelShuffle(upsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu2(self.conv(self.leaky_relu(self.subpel_conv(x))))
        return out + self.upsample(x)


def _adaptor(cin: int, cout: int, stride: int) -> nn.Module | None:
    """The skip branch of a DepthConv: 2x2/s2 conv when downsampling, 1x1 conv when the widths differ, else none."""
    if stride == 2:
        return nn.Conv2d(cin, cout, kernel_size=2, stride=2)
    if cin != cout:
        return conv1x1(cin, cout)
    return None


class _ResidualDepthConv(nn.Module):
    """``conv2(depth_conv(conv1(x))) + identity`` (identity through ``adaptor`` when given); the two flavours below
    differ only in the modules they pass in."""

    def __init__(self, conv1: nn.Module, depth_conv: nn.Module, conv2: nn.Module, adaptor: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv1
        self.depth_conv = depth_conv
        self.conv2 = conv2
        self.adaptor = adaptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.adaptor is None else self.adaptor(x)
        return self.conv2(self.depth_conv(self.conv1(x))) + identity


class _Block(nn.Module):
    """Runs ``block``, an ``nn.Sequential`` of the given modules (keys ``block.0.*``, ``block.1.*``, ...)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


# ---------------------------------------------------------------------------------------------------------------
# transform flavour (analysis / synthesis)
# ---------------------------------------------------------------------------------------------------------------
class DepthConv(_ResidualDepthConv):
    """1x1 conv + LReLU(0.01), 3x3 depthwise + LReLU(0.01), 1x1 conv + LReLU(0.01), residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1, slope: float = 0.01) -> None:
        super().__init__(
            nn.Sequential(conv1x1(cin, cin), nn.LeakyReLU(slope)),
            nn.Sequential(conv3x3(cin, cin, stride=stride, groups=cin), nn.LeakyReLU(slope)),
            nn.Sequential(conv1x1(cin, cout), nn.LeakyReLU(slope)),
            _adaptor(cin, cout, stride),
        )


class ConvFFN(nn.Module):
    """1x1 conv c->4c + ReLU, 1x1 conv 4c->c + ReLU, residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv1x1(c, 4 * c), nn.ReLU(), conv1x1(4 * c, c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class DepthConvBlock(_Block):
    """Transform-flavour DepthConv followed by ConvFFN (keys ``block.0.*``, ``block.1.*``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(DepthConv(cin, cout), ConvFFN(cout))


# ---------------------------------------------------------------------------------------------------------------
# prior flavour (hyper encoder / decoder, fusion, spatial prior)
# ---------------------------------------------------------------------------------------------------------------
def prior_ffn_hidden(c: int) -> int:
    """Hidden width of the prior-flavour FFN: ``max(min(4c, 1024), 2c)``."""
    return max(min(4 * c, 1024), 2 * c)


class PriorDepthConv(_ResidualDepthConv):
    """1x1 conv + LReLU(0.01), bare 3x3 depthwise, bare 1x1 conv, residual add (1x1 adaptor when widths differ)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, slope: float = 0.01) -> None:
        super().__init__(
            nn.Sequential(conv1x1(cin, cin), nn.LeakyReLU(slope)),
            conv3x3(cin, cin, stride=stride, groups=cin),
            conv1x1(cin, cout),
            _adaptor(cin, cout, stride),
        )
        self.slope = slope


class PriorConvFFN(nn.Module):
    """1x1 conv c->h + LReLU(0.1), 1x1 conv h->c + LReLU(0.1), residual add; h = max(min(4c,1024),2c)."""

    def __init__(self, c: int, slope: float = 0.1) -> None:
        super().__init__()
        self.slope = slope
        h = prior_ffn_hidden(c)
        self.conv = nn.Sequential(conv1x1(c, h), nn.LeakyReLU(slope), conv1x1(h, c), nn.LeakyReLU(slope))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class PriorDepthConvBlock(_Block):
    """Prior-flavour DepthConv + ConvFFN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(PriorDepthConv(cin, cout), PriorConvFFN(cout))


class PriorDepthConvBlockUpsample(_Block):
    """Prior-flavour DepthConv + ConvFFN + 1x1 conv (out -> 4 out) + PixelShuffle(2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(PriorDepthConv(cin, cout), PriorConvFFN(cout), conv1x1(cout, 4 * cout), nn.PixelShuffle(2))
