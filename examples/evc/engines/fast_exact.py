"""The exact twin, channels-last: :class:`FastExactNet` computes bit for bit what :class:`~.exact.ExactNet` computes.

Same weight and activation grids, same order of every rounding elementwise operation; only the exact integer sums are
formed differently: per-pixel activation grids become reductions over the contiguous last dimension, every 1x1
convolution is one ``mm`` on a (pixels, channels) matrix, the adaptor of a block is merged into the block's first
GEMM (same input, same grid), a dense 3x3 convolution is 9 GEMMs over shifted contiguous windows of the zero-padded,
row-flattened input, a depthwise 3x3 is 9 shifted multiply-adds that skip the zero padding (every partial sum is an
integer below 2^53, so any grouping of the sum is exact), and per-pixel work runs in bands (on the CPU, at any thread
count). The tests check ``torch.equal`` against ExactNet. On a CPU it is about as fast as ExactNet: both are bound by
float64 GEMMs; on a GPU it saves the layout changes and, with CUDA graphs, the kernel launches.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import ConvFFN, DepthConv, PriorConvFFN, PriorDepthConv, ResidualBlockUpsample
from .exact import MANTISSA_BITS, W_BITS, chain, exponent, pow2, quantize_rows
from .nhwc import (Fn, GraphCache, LayerWalker, bands_on, depth_conv_parts, ffn_parts, pixel_shuffle_nhwc, ps_rows,
                   shuffled_banded, to_nchw, to_nhwc, use_bands)

__all__ = ["FastExactNet"]

#: band size of the exact (float64) path: bands of >= ~1000 pixels even for the widest prior layers, because float64
#: GEMMs with fewer rows lose more than the cache gains
EXACT_BAND_BYTES = 1 << 24
#: the exact dense 3x3 convolution cuts bands of a quarter of the exact band size: its nine K = C_in GEMMs per band
#: accumulate into one output band, which then stays closer to the cache (any band size gives the same numbers: the
#: sums are exact integers in any grouping)
_CONV3_BAND_DIVISOR = 4


def _a_bits(fan_in: int) -> int:
    a = MANTISSA_BITS - W_BITS - max(1, math.ceil(math.log2(fan_in)))
    if a < 8:
        raise ValueError(f"fan-in {fan_in} too large for exact evaluation")
    return a


def _lrelu_(x: torch.Tensor, slope: float | None) -> torch.Tensor:
    """In-place LeakyReLU (slope None: ReLU): one correctly rounded multiply, as in ExactNet."""
    return torch.relu_(x) if slope is None else F.leaky_relu_(x, slope)


def _band(total: int, per_item_bytes: int, band_bytes: int) -> int:
    """Items per band of the exact path, so that one band of the largest intermediate is about ``band_bytes`` (all
    items in one band where :func:`use_bands` says so). Unlike the float path this bands at any thread count: MKL's
    float64 GEMMs over ~100k pixels run at about half the rate of the same GEMMs in bands of ~16k pixels."""
    if not use_bands(total * per_item_bytes, band_bytes, single_thread_only=False):
        return total
    return max(1, min(total, band_bytes // max(1, per_item_bytes)))


def _to_grid_(acc: torch.Tensor, scale_w: torch.Tensor | None, e: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """In place: exact integer sums back to values, ``acc * scale_w * 2**e + bias``, the same operations in the
    same order as ExactNet (``scale_w`` is None where :func:`_fold_scales` moved it into the weights)."""
    if scale_w is not None:
        acc.mul_(scale_w)
    return acc.mul_(pow2(e)).add_(bias)


class _XLin:
    """One or more 1x1 convolutions that read the same input, as one exact float64 GEMM on NHWC data.

    The per-(sample, pixel) activation grid depends only on the input and the fan-in, so merged convolutions see
    exactly the grid each would see alone; weight rows are quantised independently (:func:`quantize_rows`), and
    evaluating any subset of pixels (a band) gives the same numbers for those pixels."""

    def __init__(self, convs: Sequence[nn.Conv2d], device: torch.device,
                 rows: Sequence[torch.Tensor | None] | None = None) -> None:
        wqs, ks, bs_ = [], [], []
        fan_in = None
        self.splits: list[int] = []
        for i, conv in enumerate(convs):
            if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
                raise NotImplementedError("exact path supports only plain 1x1 convolutions here")
            w = conv.weight.detach().to(torch.float64).flatten(1)
            fan_in = w.shape[1] if fan_in is None else fan_in
            if w.shape[1] != fan_in:
                raise ValueError("merged 1x1 convolutions must share the input")
            wq, k = quantize_rows(w)
            b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(w.shape[0],
                                                                                                 dtype=torch.float64)
            perm = rows[i] if rows is not None else None
            if perm is not None:
                wq, k, b = wq[perm], k[perm], b[perm]
            wqs.append(wq)
            ks.append(k)
            bs_.append(b)
            self.splits.append(w.shape[0])
        assert fan_in is not None
        self.fan_in = fan_in
        self.a_bits = _a_bits(fan_in)
        wq, scale_w = _fold_scales(torch.cat(wqs), torch.cat(ks))
        # (C_in, C_out_total) as the transpose of a contiguous (C_out, C_in) matrix: MKL's dgemm is faster with B in
        # this layout at these shapes; the integer sums are exact in any order
        self.wqt = wq.contiguous().to(device).t()
        self.scale_w = scale_w.to(device) if scale_w is not None else None
        self.bias = torch.cat(bs_).to(device)
        self.out_channels = self.wqt.shape[1]

    def rows(self, xf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(P, C_in) -> (P, C_out): the exact evaluation, pixel by pixel (into ``out`` when given)."""
        # amax and amin separately: faster than aminmax over a short contiguous dim; max is exact either way
        e = exponent(torch.maximum(xf.amax(1, keepdim=True), xf.amin(1, keepdim=True).neg_())) - self.a_bits
        xq = torch.mul(xf, pow2(-e)).round_()
        acc = torch.mm(xq, self.wqt, out=out)  # exact (scaled) integer sums in float64
        return _to_grid_(acc, self.scale_w, e, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.rows(x.reshape(-1, shape[-1])).view(*shape[:-1], self.out_channels)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Split a merged output into the outputs of the individual convolutions (views)."""
        return list(torch.split(out, self.splits, dim=-1))


def _pixels_banded(fn: Callable[..., torch.Tensor], x: torch.Tensor, out_channels: int,
                   per_pixel_bytes: int, band_bytes: int) -> torch.Tensor:
    """Apply a per-pixel function ``fn(rows, out=None)`` to (..., C) data in bands of pixels, each band written
    straight into its slice of the output (exact: every pixel is independent)."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    n = xf.shape[0]
    step = _band(n, per_pixel_bytes, band_bytes)
    if step >= n:
        return fn(xf).view(*shape[:-1], out_channels)
    out = torch.empty(n, out_channels, dtype=x.dtype, device=x.device)
    for s in range(0, n, step):
        fn(xf[s:s + step], out=out[s:s + step])
    return out.view(*shape[:-1], out_channels)




def _sample_exponent(x: torch.Tensor, a_bits: int) -> torch.Tensor:
    b = x.shape[0]
    flat = x.reshape(b, -1)
    return (exponent(torch.maximum(flat.amax(1), flat.amin(1).neg_())) - a_bits).view(b, 1, 1, 1)


def _fold_scales(wq: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the per-row power-of-two weight scales ``k`` into the integer weight rows ``wq`` where that is exact.

    The reference multiplies the exact integer sums by ``2**k`` afterwards. With ``wq * 2**k`` as the weights every
    product and every partial sum of output channel j is an integer below 2^53 times ``2**k_j``, so the GEMM returns
    the same scaled sums exactly, and one pass over the output is saved. Exact while ``2**k_j`` keeps such numbers
    normal and finite (-1022 <= k_j <= 969, i.e. any realistic weights); otherwise the scales stay separate.
    Returns (weights, scales to apply afterwards or None)."""
    if int(k.min()) >= -1022 and int(k.max()) <= 1023 - 54:
        return wq * pow2(k).unsqueeze(1), None
    return wq, pow2(k)


class _XDW:
    """Exact 3x3 depthwise convolution on NHWC: per-sample activation grid, 9 multiply-adds on integers (taps that
    fall on the zero padding are skipped, which only drops exact zeros), evaluated in bands of rows."""

    def __init__(self, conv: nn.Conv2d, device: torch.device) -> None:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.groups != conv.in_channels \
                or conv.padding != (1, 1) or conv.in_channels != conv.out_channels:
            raise NotImplementedError("exact path supports only stride-1 3x3 depthwise convolutions")
        w = conv.weight.detach().to(torch.float64)[:, 0]
        self.a_bits = MANTISSA_BITS - W_BITS - 4
        wq, scale_w = _fold_scales(*quantize_rows(w.flatten(1)))
        self.wq = wq.t().contiguous().to(device)  # (9, C)
        self.scale_w = scale_w.to(device) if scale_w is not None else None
        self.bias = conv.bias.detach().to(torch.float64).to(device)

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise the whole input once (the grid is per sample): integers and exponents."""
        e = _sample_exponent(x, self.a_bits)
        return torch.mul(x, pow2(-e)).round_(), e

    def rows(self, xq: torch.Tensor, e: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Output rows [r0, r1) of the convolution of the prepared input."""
        _, h, w, _ = xq.shape
        acc = xq[:, r0:r1] * self.wq[4]
        for t in (0, 1, 2, 3, 5, 6, 7, 8):
            di, dj = t // 3 - 1, t % 3 - 1
            o0, o1 = max(r0, -di), min(r1, h - di)  # output rows whose input row r+di exists
            c0, c1 = max(0, -dj), min(w, w - dj)
            if o0 >= o1:
                continue
            acc[:, o0 - r0:o1 - r0, c0:c1].addcmul_(xq[:, o0 + di:o1 + di, c0 + dj:c1 + dj], self.wq[t])
        return _to_grid_(acc, self.scale_w, e, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, e = self.prepare(x)
        return self.rows(xq, e, 0, x.shape[1])


class _XConv3:
    """Exact dense 3x3 stride-1 convolution (padding 1) on NHWC: 9 GEMMs over shifted windows of the padded input,
    flattened row-major and computed on a grid 2 columns wider than the output (those columns are dropped), in
    bands of rows so the accumulator stays in cache."""

    def __init__(self, conv: nn.Conv2d, device: torch.device, band_bytes: int) -> None:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
                or conv.dilation != (1, 1):
            raise NotImplementedError("exact path supports only stride-1 3x3 dense convolutions here")
        w = conv.weight.detach().to(torch.float64)  # (O, C, 3, 3)
        self.a_bits = _a_bits(w[0].numel())
        wq, scale_w = _fold_scales(*quantize_rows(w.flatten(1)))
        wq = wq.view_as(w)
        # (C, O) views of contiguous (O, C) taps, the faster B layout for dgemm (see _XLin)
        self.taps = [wq[:, :, i, j].contiguous().to(device).t() for i in range(3) for j in range(3)]
        self.scale_w = scale_w.to(device) if scale_w is not None else None
        self.bias = conv.bias.detach().to(torch.float64).to(device)
        self.band_bytes = band_bytes // _CONV3_BAND_DIVISOR

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        o = self.taps[0].shape[1]
        e = _sample_exponent(x, self.a_bits)
        wp = w + 2
        # zero padding (1 row above, 2 below, 1 column each side), the scaled input written straight into its interior
        xp = x.new_empty(b, h + 3, wp, c)
        xp[:, 0].zero_()
        xp[:, h + 1:].zero_()
        xp[:, 1:h + 1, 0].zero_()
        xp[:, 1:h + 1, w + 1].zero_()
        torch.mul(x, pow2(-e), out=xp[:, 1:h + 1, 1:w + 1]).round_()
        flat = xp.view(b, (h + 3) * wp, c)
        out = torch.empty(b, h, w, o, dtype=x.dtype, device=x.device)
        rows = _band(h, wp * (o + c) * x.element_size(), self.band_bytes)
        for s in range(b):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                n0, n = r0 * wp, (r1 - r0) * wp
                acc = torch.mm(flat[s, n0:n0 + n], self.taps[0])
                for t in range(1, 9):
                    off = n0 + (t // 3) * wp + t % 3
                    acc.addmm_(flat[s, off:off + n], self.taps[t])
                out[s, r0:r1] = acc.view(r1 - r0, wp, o)[:, :w]
        return _to_grid_(out, self.scale_w, e, self.bias)


class ExactBuilder(LayerWalker):
    """NHWC closures mirroring :func:`.exact.ExactNet`'s compiler operation for operation (every rounding elementwise
    operation in the same order on the same operands; in-place where the operand is a fresh temporary)."""

    kind = "exact"

    def __init__(self, device: torch.device, band_bytes: int) -> None:
        self.dev = device
        self.band_bytes = band_bytes

    def shuffled_conv1x1(self, conv: nn.Conv2d, r: int) -> Fn:
        """The 1x1 conv emits (i, j, c) order, so the NHWC pixel shuffle moves whole channel vectors."""
        lin = _XLin([conv], self.dev, [ps_rows(r, conv.out_channels // (r * r))])
        return lambda x: pixel_shuffle_nhwc(self._lin(lin, x), r)

    def depth_conv(self, m: DepthConv | PriorDepthConv, ffn: ConvFFN | PriorConvFFN | None = None) -> Fn:
        """The DepthConv (see :meth:`_depth_conv`), then the FFN as its own closure (no fusion on this path)."""
        f = self._depth_conv(*depth_conv_parts(m))
        return f if ffn is None else chain([f, self.ffn(ffn)])

    def conv2d(self, m: nn.Conv2d) -> Fn:
        """Plain 1x1 convolutions as one exact GEMM, depthwise 3x3 and dense 3x3 by their exact kernels."""
        if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1:
            lin = _XLin([m], self.dev)
            return lambda x: self._lin(lin, x)
        if m.groups > 1 and m.groups == m.in_channels:
            return _XDW(m, self.dev)
        return _XConv3(m, self.dev, self.band_bytes)

    def _lin(self, lin: _XLin, x: torch.Tensor) -> torch.Tensor:
        return _pixels_banded(lin.rows, x, lin.out_channels, (lin.fan_in + lin.out_channels) * 8, self.band_bytes)

    def _depth_conv(self, c1: nn.Conv2d, s1: float, dwc: nn.Conv2d, sdw: float | None, c2: nn.Conv2d,
                    s2: float | None, adaptor: nn.Module | None) -> Fn:
        """ExactNet: ``c2(dw(lrelu(c1(x))))`` (+ the activations of the transform flavour) ``+ identity``.
        Bands: the first GEMM by pixels; the depthwise conv needs the whole input for its per-sample grid, then
        dw, activations, the second GEMM and the residual add run in bands of rows."""
        if adaptor is not None and not (isinstance(adaptor, nn.Conv2d) and adaptor.kernel_size == (1, 1)):
            raise NotImplementedError("exact path supports only 1x1 adaptors")
        first = _XLin([c1] if adaptor is None else [c1, adaptor], self.dev)
        dw = _XDW(dwc, self.dev)
        second = _XLin([c2], self.dev)
        c_mid = c1.out_channels
        band_bytes = self.band_bytes

        def f(x: torch.Tensor) -> torch.Tensor:
            h = self._lin(first, x)
            t, ident = (h, x) if adaptor is None else first.split(h)
            t = _lrelu_(t, s1)
            xq, e = dw.prepare(t)
            bsz, hh, ww, _ = t.shape
            out = torch.empty(bsz, hh, ww, second.out_channels, dtype=x.dtype, device=x.device)
            rows = _band(hh, bsz * ww * (c_mid + second.out_channels) * 8, band_bytes)
            for r0 in range(0, hh, rows):
                r1 = min(hh, r0 + rows)
                u = dw.rows(xq, e, r0, r1)
                if sdw is not None:
                    u = _lrelu_(u, sdw)
                v = second(u)
                if s2 is not None:
                    v = _lrelu_(v, s2)
                out[:, r0:r1] = v.add_(ident[:, r0:r1])
            return out
        return f

    def ffn(self, m: ConvFFN | PriorConvFFN) -> Fn:
        """ExactNet: ``x + act(l2(act(l1(x))))``, in bands of pixels."""
        c1, c2, sa, sb = ffn_parts(m)
        l1, l2 = _XLin([c1], self.dev), _XLin([c2], self.dev)

        def rows(xf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return _lrelu_(l2.rows(_lrelu_(l1.rows(xf), sa), out=out), sb).add_(xf)

        per_px = (l1.fan_in + 2 * l1.out_channels + l2.out_channels) * 8
        return lambda x: _pixels_banded(rows, x, l2.out_channels, per_px, self.band_bytes)

    def upsample_block(self, m: ResidualBlockUpsample) -> Fn:
        """ExactNet: ``lrelu(cv(lrelu(ps(sp(x)), s1)), s2) + ps(up(x))``; sp and up share one GEMM."""
        r = m.subpel_conv[1].upscale_factor
        if m.upsample[1].upscale_factor != r:
            raise NotImplementedError("upsampling factors differ")
        rows = ps_rows(r, m.conv.out_channels)
        both = _XLin([m.subpel_conv[0], m.upsample[0]], self.dev, [rows, rows])
        cv = self.module(m.conv)
        s1, s2 = m.leaky_relu.negative_slope, m.leaky_relu2.negative_slope

        def f(x: torch.Tensor) -> torch.Tensor:
            w = x.shape[2]
            band_h = max(1, min(x.shape[1], _band(x.shape[1] * w, (both.fan_in + both.out_channels) * 8,
                                                  self.band_bytes) // w))
            buf = torch.empty(band_h * w, both.out_channels, dtype=x.dtype, device=x.device)
            main, skip = shuffled_banded(
                lambda rows: both.rows(rows.reshape(-1, both.fan_in), out=buf[:rows.shape[0] * w]), x, r,
                both.splits, band_h)
            return _lrelu_(cv(_lrelu_(main, s1)), s2).add_(skip)
        return f


class FastExactNet:
    """Channels-last twin of :class:`~.exact.ExactNet` with bit-identical float64 outputs (NCHW in and out).

    Use :meth:`nhwc` to stay channels-last between networks. ``band_bytes`` sizes the pixel bands of the widest
    intermediate on the CPU (a quarter of it for dense 3x3 convolutions; no bands on other devices); any band size
    gives the same numbers. ``cuda_graphs``: on CUDA, capture one graph per input shape and replay it (the same
    kernels, so the same numbers; the network is a few hundred small kernels whose launches dominate its time on a
    GPU)."""

    def __init__(self, module: nn.Module, device: torch.device | str | None = None,
                 band_bytes: int = EXACT_BAND_BYTES, cuda_graphs: bool = False) -> None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        self._fn = ExactBuilder(dev, bands_on(dev, band_bytes)).module(module)
        self._graphs = GraphCache.if_wanted(cuda_graphs, dev, self._fn)

    @torch.no_grad()
    def nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """(B,H,W,C) float64 -> (B,H',W',C') float64."""
        if x.dtype != torch.float64:
            raise TypeError("FastExactNet expects float64 input")
        x = x.contiguous()
        return self._graphs(x) if self._graphs is not None else self._fn(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.nhwc(to_nhwc(x)))
