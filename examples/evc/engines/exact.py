"""Deterministic ("exact") evaluation of the entropy-parameter networks.

Encoder and decoder must compute the same Gaussian scale indices and means bit for bit, or the decoder desyncs.
Ordinary float convolutions do not guarantee that: the summation order of a reduction depends on the thread count,
the batch size, the BLAS blocking and the device. We remove the dependence instead of hoping it away:

* The prior networks (``hyper_dec``, ``y_prior_fusion``, ``y_spatial_prior``) consist only of 1x1 convolutions,
  3x3 depthwise convolutions, LeakyReLUs, residual adds and PixelShuffle.
* Every 1x1 convolution (the only reductions) is computed in float64 on *integers*: the weights of each output
  channel are rounded to ``W_BITS`` significant bits (a per-row power-of-two scale), and the input activations of each
  (sample, pixel) are rounded to ``53 - W_BITS - ceil(log2(fan_in))`` bits relative to their largest magnitude over the
  channels (a per-pixel power-of-two scale). Every product and every partial sum is then an integer below 2^53, so the
  float64 matmul is exact, whatever order BLAS adds in. Scaling back by powers of two is exact.
* Everything else is elementwise IEEE arithmetic (add, multiply, divide, round, compare), correctly rounded and
  therefore identical in vectorised and scalar code paths. The depthwise 3x3 conv is 9 shifted multiply-adds in a
  fixed order. No transcendental function is used.

The per-pixel scale is chosen from the data, but max() is exact, so both sides choose the same scale; per-pixel and
per-sample scales make the result independent of the batch composition. Precision: 20 bits for weights and >= 22 bits
for activations, i.e. close to float32 accuracy; the exact path differs from the float32 path by float noise only.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..models.layers import (
    ConvFFN,
    DepthConv,
    DepthConvBlock,
    ResidualBlockUpsample,
    PriorConvFFN,
    PriorDepthConv,
    PriorDepthConvBlock,
    PriorDepthConvBlockUpsample,
)

__all__ = ["W_BITS", "MANTISSA_BITS", "pow2", "exponent", "ExactNet", "quantize_rows", "chain"]

#: significant bits kept per weight row
W_BITS = 20
#: significant bits of a float64: every exact product and partial sum stays below 2**MANTISSA_BITS
MANTISSA_BITS = 53


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float64 2**k for integer tensors k in [-1022, 1023], built from the bit pattern (no exp2 call)."""
    k = k.to(torch.int64).clamp(-1022, 1023)
    return ((k + 1023) << 52).view(torch.float64)


def _maxabs(x: torch.Tensor, dim: int | tuple[int, ...], keepdim: bool = True) -> torch.Tensor:
    """max |x| along dim in one pass (max is exact, so order does not matter)."""
    if isinstance(dim, tuple):
        lo = x.amin(dim=dim, keepdim=keepdim)
        hi = x.amax(dim=dim, keepdim=keepdim)
    else:
        lo, hi = torch.aminmax(x, dim=dim, keepdim=keepdim)
    return torch.maximum(hi, lo.neg())


def exponent(maxabs: torch.Tensor) -> torch.Tensor:
    """Integer e with maxabs < 2**e (e = 0 for maxabs = 0)."""
    _, e = torch.frexp(maxabs)
    return e.to(torch.int64)


def quantize_rows(w: torch.Tensor, bits: int = W_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Round each row of a 2-D float64 matrix to ``bits`` significant bits.

    Returns (integer-valued matrix with |entries| <= 2**bits, per-row exponent k such that w ~= wq * 2**k)."""
    maxabs = w.abs().amax(dim=1)
    k = exponent(maxabs) - bits
    wq = torch.round(w * pow2(-k).unsqueeze(1))
    return wq, k


class _Lin:
    """A 1x1 convolution prepared for exact evaluation."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise NotImplementedError("exact path supports only plain 1x1 convolutions here")
        w = conv.weight.detach().to(torch.float64).flatten(1)
        self.fan_in = w.shape[1]
        self.a_bits = MANTISSA_BITS - W_BITS - max(1, math.ceil(math.log2(self.fan_in)))
        if self.a_bits < 8:
            raise ValueError(f"fan-in {self.fan_in} too large for exact evaluation")
        self.wq, k = quantize_rows(w)
        self.scale_w = pow2(k).view(1, -1, 1)
        self.bias = conv.bias.detach().to(torch.float64).view(1, -1, 1, 1) if conv.bias is not None else None

    def to(self, device: torch.device) -> "_Lin":
        self.wq = self.wq.to(device)
        self.scale_w = self.scale_w.to(device)
        if self.bias is not None:
            self.bias = self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xf = x.reshape(b, c, h * w)
        e = exponent(_maxabs(xf, 1)) - self.a_bits  # (b,1,hw)
        xq = torch.mul(xf, pow2(-e)).round_()  # integers, |xq| <= 2**a_bits
        acc = torch.matmul(self.wq, xq)  # exact integer sums in float64
        out = acc.mul_(self.scale_w).mul_(pow2(e))  # two exact power-of-two scalings
        out = out.view(b, -1, h, w)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out


class _Conv:
    """A dense KxK stride-1 convolution evaluated exactly: per-row weights with ``W_BITS`` bits, activations on one
    power-of-two grid per sample (K > 1 mixes pixels, so the grid cannot be per pixel), float64 conv2d on integers.
    Any summation order gives the same result because every partial sum is an integer below 2^53."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.stride != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] or conv.dilation != (1, 1):
            raise NotImplementedError("exact path supports only stride-1 square convolutions")
        w = conv.weight.detach().to(torch.float64)
        self.pad = conv.padding
        self.groups = conv.groups
        self.fan_in = w[0].numel()
        self.a_bits = MANTISSA_BITS - W_BITS - max(1, math.ceil(math.log2(self.fan_in)))
        wq, k = quantize_rows(w.flatten(1))
        self.wq = wq.view_as(w)
        self.scale_w = pow2(k).view(1, -1, 1, 1)
        self.bias = conv.bias.detach().to(torch.float64).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "_Conv":
        self.wq, self.scale_w, self.bias = self.wq.to(device), self.scale_w.to(device), self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = exponent(_maxabs(x, (1, 2, 3))) - self.a_bits
        xq = torch.mul(x, pow2(-e)).round_()
        acc = nn.functional.conv2d(xq, self.wq, padding=self.pad, groups=self.groups)
        return acc.mul_(self.scale_w).mul_(pow2(e)).add_(self.bias)


class _DWq:
    """3x3 depthwise convolution on integers: per-channel weights with ``W_BITS`` bits, activations on one
    power-of-two grid per sample, 9 shifted multiply-adds. All partial sums are integers < 2^53, so the result is
    exact whether or not the kernel fuses multiply and add (one fused pass each, unlike grouped conv2d, which CPU
    torch runs as one tiny GEMM per channel)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.groups != conv.in_channels \
                or conv.padding != (1, 1) or conv.in_channels != conv.out_channels:
            raise NotImplementedError("exact path supports only stride-1 3x3 depthwise convolutions")
        w = conv.weight.detach().to(torch.float64)[:, 0]  # (C,3,3)
        self.a_bits = MANTISSA_BITS - W_BITS - 4  # fan-in 9
        wq, k = quantize_rows(w.flatten(1))
        self.wq = wq.view(-1, 3, 3)
        self.scale_w = pow2(k).view(1, -1, 1, 1)
        self.bias = conv.bias.detach().to(torch.float64).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "_DWq":
        self.wq, self.scale_w, self.bias = self.wq.to(device), self.scale_w.to(device), self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        e = exponent(_maxabs(x, (1, 2, 3))) - self.a_bits
        xp = nn.functional.pad(torch.mul(x, pow2(-e)).round_(), (1, 1, 1, 1))
        acc = torch.zeros_like(x)
        for i in range(3):
            for j in range(3):
                acc.addcmul_(xp[:, :, i:i + h, j:j + w], self.wq[:, i, j].view(1, c, 1, 1))
        return acc.mul_(self.scale_w).mul_(pow2(e)).add_(self.bias)


class _DW:
    """3x3 depthwise convolution as 9 shifted multiply-adds in a fixed order."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.groups != conv.in_channels \
                or conv.padding != (1, 1):
            raise NotImplementedError("exact path supports only stride-1 3x3 depthwise convolutions")
        self.w = conv.weight.detach().to(torch.float64)[:, 0]  # (C,3,3)
        self.bias = conv.bias.detach().to(torch.float64).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "_DW":
        self.w = self.w.to(device)
        self.bias = self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        xp = nn.functional.pad(x, (1, 1, 1, 1))
        out = None
        for i in range(3):
            for j in range(3):
                term = xp[:, :, i:i + h, j:j + w] * self.w[:, i, j].view(1, c, 1, 1)
                out = term if out is None else out + term
        return out + self.bias


def _lrelu(x: torch.Tensor, slope: float) -> torch.Tensor:
    # x if x > 0 else x*slope: one correctly rounded multiply, identical in vectorised and scalar kernels
    return nn.functional.leaky_relu(x, slope)


def chain(fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The composition ``fns[-1](...fns[0](x))`` of compiled layer functions."""
    def seq(x: torch.Tensor) -> torch.Tensor:
        for f in fns:
            x = f(x)
        return x
    return seq


def _compile(m: nn.Module, dev: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(m, nn.Sequential):
        return chain([_compile(c, dev) for c in m])
    if isinstance(m, (PriorDepthConvBlock, PriorDepthConvBlockUpsample, DepthConvBlock)):
        return _compile(m.block, dev)
    if isinstance(m, DepthConv):
        c1, dw, c2 = _compile(m.conv1, dev), _compile(m.depth_conv, dev), _compile(m.conv2, dev)
        ad = _compile(m.adaptor, dev) if m.adaptor is not None else None

        def tdconv(x: torch.Tensor) -> torch.Tensor:
            ident = x if ad is None else ad(x)
            return c2(dw(c1(x))) + ident
        return tdconv
    if isinstance(m, ConvFFN):
        f = _compile(m.conv, dev)
        return lambda x: x + f(x)
    if isinstance(m, ResidualBlockUpsample):
        sp, cv, up = _compile(m.subpel_conv, dev), _compile(m.conv, dev), _compile(m.upsample, dev)
        s1, s2 = m.leaky_relu.negative_slope, m.leaky_relu2.negative_slope

        def rbu(x: torch.Tensor) -> torch.Tensor:
            return _lrelu(cv(_lrelu(sp(x), s1)), s2) + up(x)
        return rbu
    if isinstance(m, PriorDepthConv):
        c1 = _Lin(m.conv1[0]).to(dev)
        s1 = m.conv1[1].negative_slope
        dw = _DWq(m.depth_conv).to(dev)
        c2 = _Lin(m.conv2).to(dev)
        ad = _Lin(m.adaptor).to(dev) if m.adaptor is not None else None

        def dconv(x: torch.Tensor) -> torch.Tensor:
            ident = x if ad is None else ad(x)
            return c2(dw(_lrelu(c1(x), s1))) + ident
        return dconv
    if isinstance(m, PriorConvFFN):
        l1, l2 = _Lin(m.conv[0]).to(dev), _Lin(m.conv[2]).to(dev)
        sa, sb = m.conv[1].negative_slope, m.conv[3].negative_slope

        def ffn(x: torch.Tensor) -> torch.Tensor:
            return x + _lrelu(l2(_lrelu(l1(x), sa)), sb)
        return ffn
    if isinstance(m, nn.Conv2d):
        if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1:
            return _Lin(m).to(dev)
        if m.groups > 1 and m.groups == m.in_channels:
            return _DWq(m).to(dev)
        return _Conv(m).to(dev)
    if isinstance(m, nn.ReLU):
        return lambda x: nn.functional.relu(x)
    if isinstance(m, nn.PixelShuffle):
        r = m.upscale_factor
        return lambda x: nn.functional.pixel_shuffle(x, r)
    if isinstance(m, nn.LeakyReLU):
        s = m.negative_slope
        return lambda x: _lrelu(x, s)
    raise NotImplementedError(f"no exact evaluation for {type(m).__name__}")


class ExactNet:
    """Exact float64 twin of a prior network or of the synthesis transform (weights are snapshotted at
    construction)."""

    def __init__(self, module: nn.Module, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        self._fn = _compile(module, dev)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float64:
            raise TypeError("ExactNet expects float64 input")
        return self._fn(x)
