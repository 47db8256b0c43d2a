"""Small reference networks for the maskdecay tests.

Plain PyTorch, no torchvision; the ResNet reuses the basic block of the ResNet example
(``examples/resnet/models.py``). Each factory returns a randomly initialised
``nn.Module`` in eval mode (so BatchNorm uses its running statistics and a
forward pass is deterministic); call ``.train()`` to train it. Every net takes
``3x32x32`` images, which keeps forward passes cheap on a CPU.

The architectures cover the coupling patterns channel pruning has to handle:

========================  =====================================================
factory                   couplings exercised
========================  =====================================================
:func:`resnet_cifar`      BatchNorm, residual adds, 1x1-conv+BN shortcuts
:func:`mobilenetv2_tiny`  depthwise convs, inverted residuals, ReLU6
:func:`unet_pixelshuffle` concat skips, ``nn.PixelShuffle(2)`` upsampling
:func:`groupnorm_net`     ``nn.GroupNorm`` (channels coupled in groups)
:func:`depthconv_block_net`  EVC DepthConv blocks (1x1 -> dw 3x3 -> 1x1, FFN)
========================  =====================================================

``ALL_NETS`` maps a short name to ``(factory, input_shape)`` for parametrised
tests.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from maskdecay_examples.resnet.models import BasicBlock as _ExampleBasicBlock

__all__ = [
    "resnet_cifar",
    "mobilenetv2_tiny",
    "unet_pixelshuffle",
    "groupnorm_net",
    "depthconv_block_net",
    "ALL_NETS",
    "example_input",
]


def finish(model: nn.Module) -> nn.Module:
    """Give BN layers non-trivial statistics/affine params and switch to eval.

    Fresh BatchNorm has weight 1, bias 0, mean 0, var 1, which makes every
    channel look alike to importance criteria and hides export bugs that mix
    up BN parameters. Randomising them (deterministically under the global
    seed) makes the nets better test subjects.
    """
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# --------------------------------------------------------------------------- ResNet


class BasicBlock(_ExampleBasicBlock):
    """ResNet basic block of the ResNet example (conv3x3-BN-ReLU-conv3x3-BN, residual add, ReLU), with its 1x1
    conv + BN shortcut stored as ``shortcut`` (the state-dict keys of these test networks)."""

    shortcut_name = "shortcut"


class ResNetCifar(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): 3 stages of ``n`` BasicBlocks."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_ch = width
        for stage, mult in enumerate((1, 2, 4)):
            out_ch = width * mult
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cifar(depth: int = 20, width: int = 16, num_classes: int = 10) -> nn.Module:
    """CIFAR-style ResNet-``depth`` (20/32/56/...: ``(depth-2)/6`` blocks per stage).

    Stages have ``width``, ``2*width``, ``4*width`` channels; stages 2 and 3 start
    with a stride-2 block whose shortcut is a 1x1 conv + BN. The classifier is
    ``model.fc``. Input ``N x 3 x 32 x 32``, output ``N x num_classes``.
    """
    return finish(ResNetCifar(depth, width, num_classes))


# --------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2Tiny(nn.Module):
    """A narrow, shallow MobileNetV2 for 32x32 inputs."""

    # (expand ratio t, output channels c, repeats n, first stride s), as in the paper's table 2
    CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        ]
        in_ch = stem
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers += [nn.Conv2d(in_ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_tiny(num_classes: int = 10) -> nn.Module:
    """MobileNetV2-style classifier: inverted residual blocks with depthwise convs.

    Stem 3x3 conv (16 ch), then blocks 16 -> 24 (s2) -> 24 -> 32 (s2) -> 32 ->
    64 (s2) -> 64 with expansion 4 (residual add where stride 1 and width is
    unchanged), a final 1x1 conv to 256, global average pool and ``model.fc``.
    Input ``N x 3 x 32 x 32``, output ``N x num_classes``.
    """
    return finish(MobileNetV2Tiny(num_classes))


# --------------------------------------------------------------------------- U-Net


def _conv_act(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1), nn.LeakyReLU(0.1, inplace=True))


class UpShuffle(nn.Module):
    """Sub-pixel upsampling: 1x1 conv to ``4*out_ch`` then ``nn.PixelShuffle(2)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 4 * out_ch, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class UNetPixelShuffle(nn.Module):
    """Two-level U-Net with strided-conv downsampling, PixelShuffle upsampling, concat skips."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, base: int = 16) -> None:
        super().__init__()
        b = base
        self.enc0 = nn.Sequential(_conv_act(in_ch, b), _conv_act(b, b))  # full res
        self.down1 = _conv_act(b, 2 * b, stride=2)  # 1/2
        self.enc1 = _conv_act(2 * b, 2 * b)
        self.down2 = _conv_act(2 * b, 4 * b, stride=2)  # 1/4
        self.mid = _conv_act(4 * b, 4 * b)
        self.up2 = UpShuffle(4 * b, 2 * b)  # -> 1/2
        self.dec1 = _conv_act(4 * b, 2 * b)  # cat(up2, enc1)
        self.up1 = UpShuffle(2 * b, b)  # -> full res
        self.dec0 = _conv_act(2 * b, b)  # cat(up1, enc0)
        self.out = nn.Conv2d(b, out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.enc0(x)
        s1 = self.enc1(self.down1(s0))
        h = self.mid(self.down2(s1))
        h = self.dec1(torch.cat([self.up2(h), s1], dim=1))
        h = self.dec0(torch.cat([self.up1(h), s0], dim=1))
        return self.out(h)


def unet_pixelshuffle(in_ch: int = 3, out_ch: int = 3, base: int = 16) -> nn.Module:
    """Small image-to-image U-Net with sub-pixel (PixelShuffle) upsampling.

    Encoder: two 3x3 convs at full resolution (``base`` ch), stride-2 conv to
    ``2*base`` (1/2), stride-2 conv to ``4*base`` (1/4). Decoder: at each level a
    1x1 conv to ``4*C`` channels + ``nn.PixelShuffle(2)``, concatenated
    (``torch.cat(dim=1)``) with the encoder feature of that level, then a 3x3
    conv. LeakyReLU(0.1) everywhere except the final 3x3 conv to ``out_ch``.
    Input ``N x in_ch x H x W`` (H, W divisible by 4), output ``N x out_ch x H x W``.
    """
    return finish(UNetPixelShuffle(in_ch, out_ch, base))


# ----------------------------------------------------------------------- GroupNorm


class GroupNormNet(nn.Module):
    """conv-GroupNorm-ReLU stack with one residual add."""

    def __init__(self, num_classes: int = 10, width: int = 32, groups: int = 8) -> None:
        super().__init__()

        def cgr(i: int, o: int, s: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.GroupNorm(groups, o), nn.ReLU(inplace=True))

        self.stem = cgr(3, width)
        self.down = cgr(width, 2 * width, 2)
        self.block_a = cgr(2 * width, 2 * width)
        self.block_b = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.GroupNorm(groups, 2 * width)
        )
        self.relu = nn.ReLU(inplace=True)
        self.head = cgr(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = self.relu(x + self.block_b(self.block_a(x)))
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def groupnorm_net(num_classes: int = 10, width: int = 32, groups: int = 8) -> nn.Module:
    """Classifier built from conv + ``nn.GroupNorm(8, C)`` + ReLU, with one residual add.

    Widths 32 -> 64 (s2) -> 64 -> 64 (+residual) -> 128 (s2), global pool,
    ``model.fc``. GroupNorm ties channels into groups of ``C/8``, so a pruner
    must keep every group's size consistent (or prune whole groups).
    Input ``N x 3 x 32 x 32``, output ``N x num_classes``.
    """
    return finish(GroupNormNet(num_classes, width, groups))


# ----------------------------------------------------------------- EVC DepthConv


class DepthConv(nn.Module):
    """EVC ``DepthConv`` (layers.py version): 1x1 -> LReLU -> dw 3x3 -> LReLU -> 1x1 -> LReLU, + x."""

    def __init__(self, ch: int, slope: float = 0.01) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(ch, ch, 1), nn.LeakyReLU(slope))
        self.depth_conv = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, groups=ch), nn.LeakyReLU(slope))
        self.conv2 = nn.Sequential(nn.Conv2d(ch, ch, 1), nn.LeakyReLU(slope))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.depth_conv(self.conv1(x)))


class ConvFFN(nn.Module):
    """EVC ``ConvFFN``: 1x1 conv to ``4*ch`` -> LReLU -> 1x1 conv back to ``ch`` -> LReLU, + x."""

    def __init__(self, ch: int, expansion: int = 4, slope: float = 0.1) -> None:
        super().__init__()
        hidden = expansion * ch
        self.conv = nn.Sequential(
            nn.Conv2d(ch, hidden, 1), nn.LeakyReLU(slope), nn.Conv2d(hidden, ch, 1), nn.LeakyReLU(slope)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class DepthConvBlock(nn.Module):
    """EVC ``DepthConvBlock`` = :class:`DepthConv` followed by :class:`ConvFFN`."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(DepthConv(ch), ConvFFN(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DepthConvNet(nn.Module):
    """Stem stride-2 conv, two DepthConvBlocks, 3x3 head conv to 3 channels."""

    def __init__(self, ch: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), nn.LeakyReLU(0.01))
        self.blocks = nn.Sequential(*[DepthConvBlock(ch) for _ in range(blocks)])
        self.head = nn.Conv2d(ch, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def depthconv_block_net(ch: int = 32) -> nn.Module:
    """Image-to-image net of EVC-style DepthConv blocks (see shared/reference/evc_official.md 1.4).

    3x3 stride-2 stem conv (3 -> ``ch``) + LeakyReLU, two ``DepthConvBlock``
    (1x1 conv -> dw 3x3 -> 1x1 conv, residual add; then FFN 1x1 to ``4*ch`` ->
    1x1 back to ``ch``, residual add), and a 3x3 head conv to 3 channels.
    All residual adds tie the stem's output channels and every block's output
    channels into one group. Input ``N x 3 x 32 x 32``, output ``N x 3 x 16 x 16``.
    """
    return finish(DepthConvNet(ch))


# ------------------------------------------------------------------------ registry

ALL_NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet20": (lambda: resnet_cifar(20), (1, 3, 32, 32)),
    "mobilenetv2": (mobilenetv2_tiny, (1, 3, 32, 32)),
    "unet": (unet_pixelshuffle, (1, 3, 32, 32)),
    "groupnorm": (lambda: groupnorm_net(groups=16), (1, 3, 32, 32)),
    "depthconv": (depthconv_block_net, (1, 3, 32, 32)),
}
"""Short name -> (factory with default arguments, example input shape)."""


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A reproducible random input of the right shape for ``ALL_NETS[name]``."""
    shape = (batch,) + ALL_NETS[name][1][1:]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)
