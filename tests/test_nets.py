"""Forward-shape checks for the reference networks in tests/nets.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

try:  # `python -m pytest` from the repo root, or tests/ as a package
    from tests.nets import ALL_NETS, depthconv_block_net, example_input, mobilenetv2_tiny, resnet_cifar
    from tests.nets import groupnorm_net, unet_pixelshuffle
except ImportError:  # pytest's rootdir-less "prepend" import of tests/
    from nets import ALL_NETS, depthconv_block_net, example_input, mobilenetv2_tiny, resnet_cifar
    from nets import groupnorm_net, unet_pixelshuffle

X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_resnet_cifar_shapes(depth: int) -> None:
    torch.manual_seed(0)
    m = resnet_cifar(depth)
    n_blocks = sum(1 for mod in m.modules() if type(mod).__name__ == "BasicBlock")
    assert n_blocks == 3 * (depth - 2) // 6
    assert m(X).shape == (2, 10)
    assert resnet_cifar(20, width=8, num_classes=7)(X).shape == (2, 7)


def test_resnet_cifar_bad_depth() -> None:
    with pytest.raises(ValueError):
        resnet_cifar(21)


def test_mobilenetv2_tiny() -> None:
    m = mobilenetv2_tiny()
    assert m(X).shape == (2, 10)
    assert any(isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 for c in m.modules())
    assert any(isinstance(a, nn.ReLU6) for a in m.modules())


def test_unet_pixelshuffle() -> None:
    m = unet_pixelshuffle()
    assert m(X).shape == (2, 3, 32, 32)
    assert unet_pixelshuffle(in_ch=1, out_ch=2, base=8)(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    assert sum(isinstance(s, nn.PixelShuffle) for s in m.modules()) == 2


def test_groupnorm_net() -> None:
    m = groupnorm_net()
    assert m(X).shape == (2, 10)
    assert any(isinstance(g, nn.GroupNorm) for g in m.modules())


def test_depthconv_block_net() -> None:
    m = depthconv_block_net()
    assert m(X).shape == (2, 3, 16, 16)
    assert depthconv_block_net(ch=16)(X).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name", sorted(ALL_NETS))
def test_registry_eval_and_deterministic(name: str) -> None:
    factory, shape = ALL_NETS[name]
    torch.manual_seed(0)
    m = factory()
    assert not m.training
    x = example_input(name, batch=2)
    assert x.shape[1:] == shape[1:]
    with torch.no_grad():
        y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2) and torch.isfinite(y1).all()
