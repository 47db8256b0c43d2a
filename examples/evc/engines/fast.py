"""Fast inference paths for the EVC codec: fused NHWC float transforms and a bit-identical NHWC exact twin.

Two kinds of networks run in a codec, with different rules:

* **Float transforms** (analysis ``enc``, ``hyper_enc``, and the synthesis ``dec`` when ``--fast-synthesis`` is
  asked for) feed nothing that the decoder must recompute, so any precision and kernel order is allowed.
  :class:`FastTransform` evaluates them channels-last (NHWC) as plain GEMMs (1x1 convolutions become one ``addmm``
  on a (pixels, channels) matrix instead of ATen's im2col path with a broadcast bias copy), oneDNN convolutions for
  the 3x3 kernels, in-place activations, the two 1x1 branches of an upsampling block merged into one GEMM, the
  pixel shuffle folded into a weight-row permutation (a block copy of whole channel vectors), the depthwise bias of
  the prior-flavour blocks folded into the next 1x1 bias, and the 4x-wide FFNs evaluated in row bands that stay in
  cache. On a CPU in float32 the layers run through the kernels of :mod:`evc.kernels`, chosen per shape: oneDNN
  1x1/KxK convolutions with the bias and the activation fused into their epilogue, and for the wide dense 3x3
  convolutions Winograd: our F(4x4,3x3) at low resolution, NNPACK's from 16,384 pixels on (``kernels=False`` turns
  them off, for comparisons). ``dtype`` may be float16/bfloat16: on GPUs, and bfloat16 on CPUs with native bf16
  (AVX512_BF16 or AMX; there through oneDNN's kernels, 2.2-2.5x faster than float32 on the Zen 4 host); on a CPU
  without native support it is emulated and slower than float32 (the engine logs a warning).
* **Entropy-parameter networks** (``hyper_dec``, ``y_prior_fusion``, ``y_spatial_prior``) and the default exact
  synthesis must give the encoder's numbers bit for bit. :class:`FastExactNet` computes *exactly* what
  :class:`evc.exact.ExactNet` computes (same weight and activation grids, same order of every rounding elementwise
  operation; only the exact integer sums are formed differently), channels-last: per-pixel activation grids become
  reductions over the contiguous last dimension, every 1x1 convolution is one ``mm`` on a (pixels, channels)
  matrix, the adaptor of a block is merged into the block's first GEMM (same input, same grid), a dense 3x3
  convolution is 9 GEMMs over shifted contiguous windows of the zero-padded, row-flattened input, a depthwise 3x3
  is 9 shifted multiply-adds that skip the zero padding (every partial sum is an integer below 2^53, so any
  grouping of the sum is exact), and per-pixel work runs in bands (on the CPU, at any thread count). Tests check
  ``torch.equal`` against ExactNet.
  It is not faster than ExactNet on a CPU: both are bound by float64 GEMMs (docs/performance.md).

:class:`FastEngine` bundles both for :func:`evc.compress` / :func:`evc.decompress` / :func:`evc.reconstruct`
(``engine=`` argument). Bitstreams from a FastEngine decode with the reference engine and vice versa; the
entropy parameters are identical. The float analysis differs from the eager float32 analysis by float noise, so a
rounding of y may occasionally flip: the stream is then a different (equally valid) stream; ``impl="eager"`` keeps
the model's own modules for the float transforms and gives byte-identical streams.

GPU options (untested in this repository's CI, which has no GPU): ``dtype`` float16/bfloat16 for the float
transforms, ``cuda_graphs=True`` (one captured graph per input shape for each float transform and each exact
network), ``compile=True`` (``torch.compile`` of the float transforms). The exact networks always run in float64 on
integers.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import types
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, NamedTuple, NoReturn, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .exact import W_BITS, _MANT, _exponent, chain, pow2, quantize_rows
from .kernels import Act, ConvKxK, Pointwise, Wide3x3, native_bf16, native_fp16, nnpack_ok, onednn_ok, use_winograd
from .layers import (
    ConvFFN,
    DepthConv,
    DepthConvBlock,
    PriorConvFFN,
    PriorDepthConv,
    PriorDepthConvBlock,
    PriorDepthConvBlockUpsample,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
)


__all__ = ["FastTransform", "EagerTransform", "FastExactNet", "FastEngine", "DTYPES", "resolve_impl", "tune_allocator",
           "to_nhwc", "to_nchw"]

#: names accepted for the float-transform precision
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)

Fn = Callable[[torch.Tensor], torch.Tensor]

#: band size in bytes of the widest per-pixel intermediate (float path)
_BAND_BYTES = 1 << 23
#: band size of the exact (float64) path: bands of >= ~1000 pixels even for the widest prior layers, because float64
#: GEMMs with fewer rows lose more than the cache gains (bench, 1 thread: 4 MiB bands made the entropy-parameter
#: networks 0.82x the reference at 1920x1088)
_EXACT_BAND_BYTES = 1 << 24
#: the exact dense 3x3 convolution cuts bands of a quarter of the exact band size (4 MiB by default): its nine
#: K = C_in GEMMs per band accumulate into one output band, which then stays closer to the cache. Measured alone,
#: 2 threads, 1/2 resolution of 768x512, 16 -> 4 MiB: 64 channels 238 -> 188 ms, 192 channels 1,080 -> 974 ms; 128
#: channels at 1/4 resolution 180 -> 147 ms (bit-identical: the sums are exact integers in any grouping)
_CONV3_BAND_DIVISOR = 4
#: a band size no intermediate reaches: bands off
_NO_BANDS = 1 << 62
#: float path at any thread count: an intermediate above this many bytes is cut into bands of _MEMORY_BAND_BYTES, to
#: bound the peak memory of large images (EVC_LL's 768-wide FFN intermediate at 1920x1088 is 1.6 GB in one piece);
#: such bands are large enough that their OpenMP regions cost nothing measurable (docs/performance.md §3.7)
_MEMORY_BAND_LIMIT = 1 << 29
_MEMORY_BAND_BYTES = 1 << 27


def _use_bands(total_bytes: int, band_bytes: int, single_thread_only: bool = True) -> bool:
    """Banding pays only for intermediates well above one band (4 bands; with the default sizes that is beyond a
    32 MiB L3 for the float path) and, on the float path, only single-threaded. Measured on the project's 2-core
    machine under load: 1 thread, EVC_SS encoder 1.06-1.09 s banded vs 1.20 s unbanded; 2 threads, 2.9 s banded vs
    1.8 s unbanded (every band is an OpenMP region whose threads wait for each other). The exact path bands at any
    thread count (``single_thread_only=False``, see :func:`_band`)."""
    return total_bytes > 4 * band_bytes and (not single_thread_only or torch.get_num_threads() == 1)


def _bands_on(device: torch.device, band_bytes: int) -> int:
    """``band_bytes`` where bands apply, else a size no intermediate reaches. Bands are a CPU cache measure: on a GPU
    they only multiply kernel launches (H200, EVC_LL 768x512: exact synthesis 81 ms banded vs 23 ms in one piece)."""
    return band_bytes if device.type == "cpu" else _NO_BANDS


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> contiguous (B,H,W,C)."""
    return x.permute(0, 2, 3, 1).contiguous()


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B,H,W,C) -> (B,C,H,W) view with channels-last strides (no copy)."""
    return x.permute(0, 3, 1, 2)


def _ps_rows(r: int, c_out: int) -> torch.Tensor:
    """Row permutation that makes a 1x1 conv with ``r*r*c_out`` outputs emit (i, j, c) order instead of PixelShuffle's
    (c, i, j), so that the NHWC pixel shuffle moves whole channel vectors."""
    return torch.arange(c_out * r * r).view(c_out, r * r).t().reshape(-1)


def _shuffled_view(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W, r*r*C) with channels in (i, j, c) order (see :func:`_ps_rows`) as the (B, H, r, W, r, C) view whose
    contiguous copy is the pixel-shuffled (B, H*r, W*r, C) tensor."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, r, r, c // (r * r)).permute(0, 1, 3, 2, 4, 5)


def _pixel_shuffle_nhwc(x: torch.Tensor, r: int) -> torch.Tensor:
    """NHWC pixel shuffle of a tensor whose channels are in (i, j, c) order (see :func:`_ps_rows`)."""
    b, h, w, c = x.shape
    return _shuffled_view(x, r).reshape(b, h * r, w * r, c // (r * r))


class _DepthConvParts(NamedTuple):
    """The layers of a DepthConv of either flavour; a slope is None where the flavour has no activation."""

    conv1: nn.Conv2d
    s1: float
    dwc: nn.Conv2d
    s_dw: float | None
    conv2: nn.Conv2d
    s2: float | None
    adaptor: nn.Module | None


def _depth_conv_parts(m: DepthConv | PriorDepthConv) -> _DepthConvParts:
    """Split a DepthConv into its convolutions and activation slopes (the prior flavour has bare dw and 1x1)."""
    if isinstance(m, PriorDepthConv):
        return _DepthConvParts(m.conv1[0], m.conv1[1].negative_slope, m.depth_conv, None, m.conv2, None, m.adaptor)
    return _DepthConvParts(m.conv1[0], m.conv1[1].negative_slope, m.depth_conv[0], m.depth_conv[1].negative_slope,
                           m.conv2[0], m.conv2[1].negative_slope, m.adaptor)


def _ffn_parts(m: ConvFFN | PriorConvFFN) -> tuple[nn.Conv2d, nn.Conv2d, float | None, float | None]:
    """The two 1x1 convolutions of an FFN and the slopes of its two activations (None: ReLU)."""
    if isinstance(m, PriorConvFFN):
        return m.conv[0], m.conv[2], m.conv[1].negative_slope, m.conv[3].negative_slope
    return m.conv[0], m.conv[2], None, None


class _LayerWalker(ABC):
    """The walk over an EVC module tree shared by the float and the exact builder: blocks are unwrapped, two pairs
    of consecutive layers in an ``nn.Sequential`` are handed over together (a 1x1 conv followed by a PixelShuffle; a
    DepthConv followed by its FFN), activations are built here, every other layer by the builder's method for its
    type. Each method returns an NHWC closure."""

    #: the builder's name in "no ... evaluation for X" errors
    kind: str

    def module(self, m: nn.Module) -> Fn:
        """The NHWC closure of any supported EVC module."""
        if isinstance(m, nn.Sequential):
            return self.sequential(m)
        if isinstance(m, (DepthConvBlock, PriorDepthConvBlock, PriorDepthConvBlockUpsample)):
            return self.module(m.block)
        if isinstance(m, (DepthConv, PriorDepthConv)):
            return self.depth_conv(m)
        if isinstance(m, (ConvFFN, PriorConvFFN)):
            return self.ffn(m)
        if isinstance(m, ResidualBlockWithStride):
            return self.stride_block(m)
        if isinstance(m, ResidualBlockUpsample):
            return self.upsample_block(m)
        if isinstance(m, nn.Conv2d):
            return self.conv2d(m)
        if isinstance(m, nn.LeakyReLU):
            s = m.negative_slope
            return lambda x: F.leaky_relu(x, s)
        if isinstance(m, nn.ReLU):
            return torch.relu
        return self.unsupported(m)

    def sequential(self, m: nn.Sequential) -> Fn:
        """The chain of the children's closures, the two fusable pairs built together."""
        items = list(m)
        fns: list[Fn] = []
        i = 0
        while i < len(items):
            c = items[i]
            nxt = items[i + 1] if i + 1 < len(items) else None
            if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) and c.groups == 1 \
                    and isinstance(nxt, nn.PixelShuffle):
                fns.append(self.shuffled_conv1x1(c, nxt.upscale_factor))
                i += 2
            elif isinstance(c, (DepthConv, PriorDepthConv)) and isinstance(nxt, (ConvFFN, PriorConvFFN)):
                fns.append(self.depth_conv(c, nxt))
                i += 2
            else:
                fns.append(self.module(c))
                i += 1
        return chain(fns)

    def unsupported(self, m: nn.Module) -> NoReturn:
        """Raise ``NotImplementedError`` for a layer this builder cannot evaluate."""
        raise NotImplementedError(f"no {self.kind} evaluation for {type(m).__name__}")

    def stride_block(self, m: ResidualBlockWithStride) -> Fn:
        """A ResidualBlockWithStride (only in the analysis transform, so unsupported unless a builder says so)."""
        return self.unsupported(m)

    @abstractmethod
    def shuffled_conv1x1(self, conv: nn.Conv2d, r: int) -> Fn:
        """A 1x1 convolution followed by ``PixelShuffle(r)``."""

    @abstractmethod
    def depth_conv(self, m: DepthConv | PriorDepthConv, ffn: ConvFFN | PriorConvFFN | None = None) -> Fn:
        """A DepthConv, followed by ``ffn`` when given."""

    @abstractmethod
    def ffn(self, m: ConvFFN | PriorConvFFN) -> Fn:
        """An FFN alone."""

    @abstractmethod
    def upsample_block(self, m: ResidualBlockUpsample) -> Fn:
        """A ResidualBlockUpsample."""

    @abstractmethod
    def conv2d(self, m: nn.Conv2d) -> Fn:
        """Any other convolution."""


# ---------------------------------------------------------------------------------------------------------------
# float transforms
# ---------------------------------------------------------------------------------------------------------------
class _FloatBuilder(_LayerWalker):
    """Turns EVC transform modules into NHWC closures with weights prepared once. ``kernels``: use the CPU kernels
    of :mod:`evc.kernels` (oneDNN epilogue fusion, Winograd) where they apply."""

    kind = "fast"

    def __init__(self, dtype: torch.dtype, device: torch.device, band_bytes: int, kernels: bool = True) -> None:
        self.dtype = dtype
        self.device = device
        self.band_bytes = band_bytes
        self.kernels = kernels
        self.onednn = kernels and onednn_ok(device, dtype)
        self.nnpack = kernels and nnpack_ok(device, dtype)

    def _t(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device, self.dtype)

    # -- primitive ops ---------------------------------------------------------------------------------------------
    def lin_params(self, conv: nn.Conv2d, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if conv.kernel_size != (1, 1) or conv.groups != 1:
            raise NotImplementedError("expected a 1x1 convolution")
        w = conv.weight.detach().flatten(1)
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
        if rows is not None:
            w, b = w[rows], b[rows]
        return self._t(w).contiguous(), self._t(b).contiguous()

    def pointwise(self, w: torch.Tensor, b: torch.Tensor, act: Act = None) -> Pointwise:
        """A 1x1 convolution (prepared weight and bias) with a fused activation."""
        return Pointwise(w, b, act, onednn=self.onednn)

    def conv(self, conv: nn.Conv2d, act: Act = None) -> Fn:
        """Any KxK convolution with a fused activation, NHWC in and out: Winograd (ours or NNPACK's, by size) for the
        wide dense 3x3 ones, else oneDNN/cuDNN on a channels-last view."""
        w = self._t(conv.weight)
        b = self._t(conv.bias) if conv.bias is not None else None
        if self.kernels and use_winograd(conv, self.device, self.dtype):
            return Wide3x3(w, b, act, onednn=self.onednn, nnpack=self.nnpack)
        return ConvKxK(w, b, conv.stride, conv.padding, conv.groups, act, onednn=self.onednn)

    # -- blocks ------------------------------------------------------------------------------------------------------
    def _band_px(self, n: int, widest: int) -> int:
        """Pixels per band for a per-pixel stage whose widest intermediate has ``widest`` channels: cache-sized
        bands where :func:`_use_bands` says so, memory-bounding ones above ``_MEMORY_BAND_LIMIT``, else one band."""
        per_px = widest * (torch.finfo(self.dtype).bits // 8)
        if _use_bands(n * per_px, self.band_bytes):
            return max(256, self.band_bytes // per_px)
        if self.band_bytes != _NO_BANDS and n * per_px > _MEMORY_BAND_LIMIT:
            return max(256, _MEMORY_BAND_BYTES // per_px)
        return n

    def ffn_rows(self, m: ConvFFN | PriorConvFFN) -> tuple[Callable[..., torch.Tensor], int]:
        """Per-pixel ``x + act(W2 act(W1 x + b1) + b2)`` on (pixels, C) rows (act = ReLU, or the prior flavour's
        LeakyReLU); returns the function and the hidden width."""
        c1, c2, slope, slope2 = _ffn_parts(m)
        if slope != slope2:
            raise NotImplementedError("prior FFN with two different slopes")
        act: Act = "relu" if slope is None else slope
        p1 = self.pointwise(*self.lin_params(c1), act)
        p2 = self.pointwise(*self.lin_params(c2), act)

        def rows(xs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.add(p2(p1(xs)), xs, out=out)
        return rows, p1.out_channels

    def depth_conv_parts(self, m: DepthConv | PriorDepthConv) -> tuple[Fn, Callable[..., torch.Tensor], int]:
        """Split a DepthConv into a spatial head ``x -> (t, identity)`` (1x1, activation, depthwise 3x3 [+ activation])
        and a per-pixel tail ``(t, identity) -> out`` (1x1 [+ activation] + identity). Prior flavour: the depthwise
        bias is folded into the second 1x1 (no activation in between)."""
        c1, s1, dwc, s_dw, c2, s2, adaptor = _depth_conv_parts(m)
        fold_dw_bias = s_dw is None
        p1 = self.pointwise(*self.lin_params(c1), s1)
        dw = ConvKxK(self._t(dwc.weight), None if fold_dw_bias else self._t(dwc.bias), dwc.stride, dwc.padding,
                     dwc.groups, s_dw, onednn=self.onednn)
        w2_64 = c2.weight.detach().to(torch.float64).flatten(1)
        b2_64 = c2.bias.detach().to(torch.float64)
        if fold_dw_bias:
            b2_64 = b2_64 + w2_64 @ dwc.bias.detach().to(torch.float64)
        p2 = self.pointwise(self._t(w2_64).contiguous(), self._t(b2_64), s2)
        ad = self.module(adaptor) if adaptor is not None else None

        def head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return dw(p1(x)), (x if ad is None else ad(x))

        def tail(t: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
            return p2(t).add_(ident)
        return head, tail, p2.out_channels

    def _banded(self, rows_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], c_out: int,
                widest: int) -> torch.Tensor:
        """Apply a per-pixel function to NHWC inputs in bands of pixels; ``rows_fn(*input_rows, out=out_rows)``."""
        shape = inputs[0].shape
        flats = [t.reshape(-1, t.shape[-1]) for t in inputs]
        n = flats[0].shape[0]
        out = torch.empty(n, c_out, dtype=flats[0].dtype, device=flats[0].device)
        step = self._band_px(n, widest)
        for s in range(0, n, step):
            rows_fn(*[f[s:s + step] for f in flats], out=out[s:s + step])
        return out.view(*shape[:-1], c_out)

    def ffn(self, m: ConvFFN | PriorConvFFN) -> Fn:
        """An FFN alone, in row bands."""
        rows, hidden = self.ffn_rows(m)
        return lambda x: self._banded(rows, [x], x.shape[-1], hidden)

    def depth_conv(self, m: DepthConv | PriorDepthConv, ffn: ConvFFN | PriorConvFFN | None = None) -> Fn:
        """A DepthConv, optionally followed by its FFN: the spatial head on the whole tensor, then the per-pixel
        tail and the FFN together in row bands (the block output of one band stays in cache)."""
        head, tail, c_out = self.depth_conv_parts(m)
        if ffn is None:
            def tail_rows(t: torch.Tensor, ident: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                return out.copy_(tail(t, ident))
            widest = c_out
        else:
            f_rows, widest = self.ffn_rows(ffn)

            def tail_rows(t: torch.Tensor, ident: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                return f_rows(tail(t, ident), out=out)

        def f(x: torch.Tensor) -> torch.Tensor:
            t, ident = head(x)
            return self._banded(tail_rows, [t, ident], c_out, widest)
        return f

    def stride_block(self, m: ResidualBlockWithStride) -> Fn:
        c1 = self.conv(m.conv1, m.leaky_relu.negative_slope)
        c2 = self.conv(m.conv2, m.leaky_relu2.negative_slope)
        ds = self.pointwise(*self.lin_params(m.downsample)) if m.downsample is not None else None
        step = m.downsample.stride[0] if m.downsample is not None else 1

        def f(x: torch.Tensor) -> torch.Tensor:
            t = c2(c1(x))
            if ds is None:
                return t.add_(x)
            return t.add_(ds(x[:, ::step, ::step] if step > 1 else x))
        return f

    def upsample_block(self, m: ResidualBlockUpsample) -> Fn:
        r = m.subpel_conv[1].upscale_factor
        cout = m.conv.out_channels
        rows = _ps_rows(r, cout)
        ws, bs_ = self.lin_params(m.subpel_conv[0], rows)
        wu, bu = self.lin_params(m.upsample[0], rows)
        both = self.pointwise(torch.cat([ws, wu]), torch.cat([bs_, bu]))
        n = ws.shape[0]
        cv = self.conv(m.conv, m.leaky_relu2.negative_slope)
        s1 = m.leaky_relu.negative_slope

        def f(x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            per_row = w * 2 * n * x.element_size()  # bytes of one input row's GEMM output
            if self.band_bytes == _NO_BANDS or b * h * per_row <= _MEMORY_BAND_LIMIT:
                t = both(x)
                main = F.leaky_relu_(_pixel_shuffle_nhwc(t[..., :n], r), s1)
                skip = _pixel_shuffle_nhwc(t[..., n:], r)
            else:  # large images: no full-size pre-shuffle output (see _MEMORY_BAND_LIMIT)
                main, skip = _shuffled_banded(both, x, r, (n, n), max(1, _MEMORY_BAND_BYTES // per_row))
                F.leaky_relu_(main, s1)
            return cv(main).add_(skip)
        return f

    def shuffled_conv1x1(self, conv: nn.Conv2d, r: int) -> Fn:
        """The 1x1 conv emits (i, j, c) order, so the NHWC pixel shuffle moves whole channel vectors."""
        p = self.pointwise(*self.lin_params(conv, _ps_rows(r, conv.out_channels // (r * r))))
        return lambda x: _pixel_shuffle_nhwc(p(x), r)

    def conv2d(self, m: nn.Conv2d) -> Fn:
        """Plain 1x1 convolutions as one GEMM, the others through oneDNN/cuDNN (or Winograd)."""
        if m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1):
            return self.pointwise(*self.lin_params(m))
        return self.conv(m)


class _GraphCache:
    """CUDA-graph replay of ``run`` on prepared inputs: one graph captured per input shape and dtype (after two
    warm-up calls outside capture, for the allocator and cuDNN plans), then replayed into a clone of its static
    output. ``run`` must not synchronise with the host. Each graph keeps its buffers on the GPU, so only the
    ``max_graphs`` most recently used shapes are kept (a stream of images of many sizes would otherwise fill the
    GPU's memory)."""

    def __init__(self, device: torch.device, run: Fn, max_graphs: int = 4) -> None:
        self.device = device
        self.run = run
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def if_wanted(cls, wanted: bool, device: torch.device, run: Fn) -> "_GraphCache | None":
        """A cache for ``run`` when graphs are asked for and the device is CUDA, else None (run directly)."""
        return cls(device, run) if wanted and device.type == "cuda" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            static_in = x.clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.run(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.run(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


class _Runner:
    """Common part of the float-transform runners: dtype/device handling, optional CUDA-graph replay."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.device = device
        self.dtype = dtype
        self._graphs = _GraphCache.if_wanted(cuda_graphs, device, self._run)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        out = self._graphs(x) if self._graphs is not None else self._run(x)
        return self._finish(out).to(torch.float32)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        return out


def _own_code(fn: Fn) -> Fn:
    """``fn`` behind a wrapper with a code object of its own. Dynamo keeps its compiled graphs and its recompile
    limit (8) per code object, and every built transform is a closure of the same ``chain`` code: without this the
    ninth (transform, shape) pair of a process silently runs uncompiled."""
    def compiled_transform(x: torch.Tensor) -> torch.Tensor:
        return fn(x)
    code = compiled_transform.__code__.replace()  # a distinct code object, hence a distinct dynamo cache
    return types.FunctionType(code, compiled_transform.__globals__, code.co_name, None,
                              compiled_transform.__closure__)


class FastTransform(_Runner):
    """Fused channels-last evaluation of an EVC float transform (``enc``, ``hyper_enc``, ``dec``, or a prior
    network in float).

    Weights are snapshotted at construction (rebuild after changing them). Input and output are NCHW tensors of
    any float dtype; the result is float32 with channels-last strides.

    Args:
        module: the transform.
        dtype: compute precision (float32; float16/bfloat16 for GPUs).
        device: where to run (default: the module's device).
        compile: wrap the evaluation in ``torch.compile`` (the first call per input shape compiles).
        cuda_graphs: on CUDA, capture one graph per input shape and replay it.
        band_bytes: size of the row bands of the 4x-wide FFN intermediates (CPU only).
        kernels: use the CPU kernels of :mod:`evc.kernels` (oneDNN convolutions with fused epilogues, Winograd) where
            their rules select them; False gives the plain GEMM/oneDNN executor (for comparisons). Off under
            ``compile``.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 compile: bool = False, cuda_graphs: bool = False, band_bytes: int = _BAND_BYTES,
                 kernels: bool = True) -> None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        super().__init__(dev, dtype, cuda_graphs)
        # under compile: one graph without Python band loops (inductor fuses the FFN epilogues itself)
        band_bytes = _NO_BANDS if compile else _bands_on(dev, band_bytes)
        self._fn = _FloatBuilder(dtype, dev, band_bytes, kernels=kernels and not compile).module(module)
        if compile:
            self._fn = torch.compile(_own_code(self._fn), dynamic=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(x.to(self.device, self.dtype))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        return to_nchw(out)


class EagerTransform(_Runner):
    """The module's own eager forward on a private copy, optionally in another dtype, in channels-last memory
    format, compiled with ``torch.compile`` or replayed from CUDA graphs (the simple alternatives to
    :class:`FastTransform`, kept for comparison and for byte-identical streams with the reference path)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 channels_last: bool = False, compile: bool = False, cuda_graphs: bool = False) -> None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        super().__init__(dev, dtype, cuda_graphs)
        mod = copy.deepcopy(module).to(dev, dtype).eval()
        self.channels_last = channels_last
        if channels_last:
            mod = mod.to(memory_format=torch.channels_last)
        self._mod: Callable[[torch.Tensor], torch.Tensor] = torch.compile(mod, dynamic=False) if compile else mod

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self._mod(x)


def tune_allocator(keep_freed: bool = True) -> bool:
    """Process-wide memory settings for the large activations of a codec run; meant for the command line
    (``evc encode/decode/eval/bench``), which calls it before it creates any tensor.

    * ``keep_freed``: keep freed memory in the process heap (glibc: no ``mmap`` for large blocks, no trimming), so
      the activation tensors of consecutive layers reuse pages that are already mapped instead of page-faulting
      fresh ones. Faster (EVC_SS 768x512 forward 634-662 vs 673-835 ms in alternating processes), but the heap
      fragments and keeps its high-water mark: EVC_LL at 1920x1088, ``evc encode`` peaks at 4.7-5.1 GB instead of
      3.5 GB and ``evc decode`` at 5.2 instead of 4.2 GB (docs/performance.md §3.7).
      ``keep_freed=False`` (the CLI's ``--low-memory``) leaves glibc's defaults.
    * Ask PyTorch to back large CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, unless the
      variable is set already; PyTorch reads it at its first CPU allocation, so this part only takes effect when no
      tensor exists yet). Kernels that stream 100-300 MB activations then miss the TLB far less: EVC 768x512
      forward, separate processes in alternation on the 2-core machine, EVC_SS 4-27 % faster in 6 of 6 pairs,
      EVC_LL 4-15 % in 4 of 6 (docs/performance.md).

    Returns whether the heap part was applied (False with ``keep_freed=False`` and where it does not apply: not
    glibc)."""
    import ctypes

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not keep_freed:
        return False

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0) == 1
    ok = mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    return ok


# ---------------------------------------------------------------------------------------------------------------
# exact twin, channels-last
# ---------------------------------------------------------------------------------------------------------------
def _a_bits(fan_in: int) -> int:
    a = _MANT - W_BITS - max(1, math.ceil(math.log2(fan_in)))
    if a < 8:
        raise ValueError(f"fan-in {fan_in} too large for exact evaluation")
    return a


def _lrelu_(x: torch.Tensor, slope: float | None) -> torch.Tensor:
    """In-place LeakyReLU (slope None: ReLU): one correctly rounded multiply, as in ExactNet."""
    return torch.relu_(x) if slope is None else F.leaky_relu_(x, slope)


def _band(total: int, per_item_bytes: int, band_bytes: int) -> int:
    """Items per band of the exact path, so that one band of the largest intermediate is about ``band_bytes`` (all
    items in one band where :func:`_use_bands` says so). Unlike the float path this bands at any thread count:
    float64 GEMMs over ~100k pixels run at half the rate of the same GEMMs in bands (MKL dgemm (98304 x 64) @
    (64 x 256): 27 GFLOP/s, (16384 x 64) @ (64 x 256): 53 GFLOP/s, 2 threads), and the EVC_SS exact synthesis at
    768x512 took 0.84-0.88 s banded vs 0.99-1.00 s unbanded with 2 threads (idle machine); the prior networks at
    1920x1088 were equal."""
    if not _use_bands(total * per_item_bytes, band_bytes, single_thread_only=False):
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
        # (C_in, C_out_total) as the transpose of a contiguous (C_out, C_in) matrix: MKL's dgemm ran 0.99-1.12x as
        # fast with B in this layout at the prior networks' shapes (1,536 x K x N, 5 % in sum) and 1.08-1.22x at the
        # synthesis's K = 64 / 256 shapes (Zen 4 host, 2 threads); the integer sums are exact in any order
        self.wqt = wq.contiguous().to(device).t()
        self.scale_w = scale_w.to(device) if scale_w is not None else None
        self.bias = torch.cat(bs_).to(device)
        self.out_channels = self.wqt.shape[1]

    def rows(self, xf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(P, C_in) -> (P, C_out): the exact evaluation, pixel by pixel (into ``out`` when given)."""
        # amax and amin separately: faster than aminmax over a short contiguous dim; max is exact either way
        e = _exponent(torch.maximum(xf.amax(1, keepdim=True), xf.amin(1, keepdim=True).neg_())) - self.a_bits
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


def _shuffled_banded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, r: int, parts: Sequence[int],
                     band_h: int) -> list[torch.Tensor]:
    """``[_pixel_shuffle_nhwc(p, r) for p in torch.split(fn(x), parts, -1)]`` without the full-size output of the
    per-pixel ``fn`` (a 1x1 convolution whose channels are in (i, j, c) order): ``fn`` runs on bands of ``band_h``
    whole input rows of one sample, and each band's shuffled rows are one contiguous slab of every output (input row
    h becomes output rows h*r .. h*r+r-1). Saves a tensor twice the size of the block's output: 1.6 GB (float64)
    in EVC_LL's last upsampling block at 1920x1088."""
    b, h, w, _ = x.shape
    outs = [torch.empty(b, h * r, w * r, c // (r * r), dtype=x.dtype, device=x.device) for c in parts]
    for i in range(b):
        for h0 in range(0, h, band_h):
            h1 = min(h, h0 + band_h)
            t = fn(x[i, h0:h1]).reshape(1, h1 - h0, w, sum(parts))
            for out, part in zip(outs, torch.split(t, list(parts), dim=-1)):
                src = _shuffled_view(part, r)
                out[i:i + 1, h0 * r:h1 * r].view(src.shape).copy_(src)  # the slab of output rows h0*r .. h1*r-1
    return outs


def _sample_exponent(x: torch.Tensor, a_bits: int) -> torch.Tensor:
    b = x.shape[0]
    flat = x.reshape(b, -1)
    return (_exponent(torch.maximum(flat.amax(1), flat.amin(1).neg_())) - a_bits).view(b, 1, 1, 1)


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
        self.a_bits = _MANT - W_BITS - 4
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


class _ExactBuilder(_LayerWalker):
    """NHWC closures mirroring :func:`evc.exact._compile` operation for operation (every rounding elementwise
    operation in the same order on the same operands; in-place where the operand is a fresh temporary)."""

    kind = "exact"

    def __init__(self, device: torch.device, band_bytes: int) -> None:
        self.dev = device
        self.band_bytes = band_bytes

    def shuffled_conv1x1(self, conv: nn.Conv2d, r: int) -> Fn:
        """The 1x1 conv emits (i, j, c) order, so the NHWC pixel shuffle moves whole channel vectors."""
        lin = _XLin([conv], self.dev, [_ps_rows(r, conv.out_channels // (r * r))])
        return lambda x: _pixel_shuffle_nhwc(self._lin(lin, x), r)

    def depth_conv(self, m: DepthConv | PriorDepthConv, ffn: ConvFFN | PriorConvFFN | None = None) -> Fn:
        """The DepthConv (see :meth:`_depth_conv`), then the FFN as its own closure (no fusion on this path)."""
        f = self._depth_conv(*_depth_conv_parts(m))
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
        c1, c2, sa, sb = _ffn_parts(m)
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
        rows = _ps_rows(r, m.conv.out_channels)
        both = _XLin([m.subpel_conv[0], m.upsample[0]], self.dev, [rows, rows])
        cv = self.module(m.conv)
        s1, s2 = m.leaky_relu.negative_slope, m.leaky_relu2.negative_slope

        def f(x: torch.Tensor) -> torch.Tensor:
            w = x.shape[2]
            band_h = max(1, min(x.shape[1], _band(x.shape[1] * w, (both.fan_in + both.out_channels) * 8,
                                                  self.band_bytes) // w))
            buf = torch.empty(band_h * w, both.out_channels, dtype=x.dtype, device=x.device)
            main, skip = _shuffled_banded(
                lambda rows: both.rows(rows.reshape(-1, both.fan_in), out=buf[:rows.shape[0] * w]), x, r,
                both.splits, band_h)
            return _lrelu_(cv(_lrelu_(main, s1)), s2).add_(skip)
        return f


class FastExactNet:
    """Channels-last twin of :class:`evc.exact.ExactNet` with bit-identical float64 outputs (NCHW in and out).

    Use :meth:`nhwc` to stay channels-last between networks. ``band_bytes`` sizes the pixel bands of the widest
    intermediate on the CPU (a quarter of it for dense 3x3 convolutions; no bands on other devices); any band size
    gives the same numbers. ``cuda_graphs``: on CUDA, capture one graph per input shape and replay it (the same
    kernels, so the same numbers; the network is a few hundred small kernels whose launches dominate its time on a
    GPU)."""

    def __init__(self, module: nn.Module, device: torch.device | str | None = None,
                 band_bytes: int = _EXACT_BAND_BYTES, cuda_graphs: bool = False) -> None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        self._fn = _ExactBuilder(dev, _bands_on(dev, band_bytes)).module(module)
        self._graphs = _GraphCache.if_wanted(cuda_graphs, dev, self._fn)

    @torch.no_grad()
    def nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """(B,H,W,C) float64 -> (B,H',W',C') float64."""
        if x.dtype != torch.float64:
            raise TypeError("FastExactNet expects float64 input")
        x = x.contiguous()
        return self._graphs(x) if self._graphs is not None else self._fn(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.nhwc(to_nhwc(x)))


# ---------------------------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------------------------
def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The float-transform implementation that ``impl="auto"`` stands for, by measurements on an H200
    (docs/performance.md §3.4):

    * ``"eager"`` (cuDNN's NCHW kernels) for float32 on CUDA. There the fused executor's networks-only forward was
      0.73-0.90x the eager one for EVC_LL at 768x512 and for EVC_SS and EVC_LL at 1920x1088. It was 1.10-1.16x
      only for EVC_SS at 768x512.
    * ``"fused"`` everywhere else. On the CPU it is the fast path. On CUDA with fp16/bf16 and CUDA graphs it beat
      eager in all 8 measured rows (networks-only 1.4-1.7x).

    Explicit ``"fused"`` / ``"eager"`` pass through."""
    if impl not in ("auto", "fused", "eager"):
        raise ValueError(f"impl must be 'auto', 'fused' or 'eager', got {impl!r}")
    if impl != "auto":
        return impl
    return "eager" if device.type == "cuda" and dtype == torch.float32 else "fused"


class FastEngine:
    """The networks a codec run uses, in their fast form (see the module docstring). Interface of
    :class:`evc.codec.ReferenceEngine`.

    Args:
        model: an EVC model in eval mode (weights are snapshotted; rebuild the engine after changing them).
        dtype: precision of the float transforms (analysis, hyper_enc, float synthesis): ``torch.float32``
            (default), ``float16`` or ``bfloat16``. The exact networks always run in float64 on integers.
        impl: ``"fused"`` (:class:`FastTransform`, channels-last by construction), ``"eager"``
            (:class:`EagerTransform`: the model's own modules; with float32 and no other option the streams are
            byte-identical to the reference engine's), or ``"auto"`` (default): the faster of the two for the
            device and dtype, see :func:`resolve_impl`.
        channels_last: ``impl="eager"`` only: channels-last memory format.
        compile, kernels: see :class:`FastTransform` (float transforms only).
        cuda_graphs: on CUDA, replay captured graphs for the float transforms and for the exact networks (per input
            shape; the exact networks give the same numbers either way).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32, impl: str = "auto",
                 channels_last: bool = False, compile: bool = False, cuda_graphs: bool = False,
                 kernels: bool = True) -> None:
        from .codec import _state_key  # local import: codec must not depend on this module

        dev = next(model.parameters()).device
        if dev.type == "cpu" and ((dtype == torch.bfloat16 and not native_bf16())
                                  or (dtype == torch.float16 and not native_fp16())):
            log.warning("%s on this CPU is emulated (no %s instructions): slower than float32, by 8x for float16 "
                        "on the project's benchmark host; use float32 here", dtype,
                        "AVX512_BF16/AMX-BF16" if dtype == torch.bfloat16 else "AVX512_FP16/AMX-FP16")
        self.impl = resolve_impl(impl, dev, dtype)
        self.model = model
        self.key = _state_key(model)
        self.dtype = dtype
        self.device = dev

        self._opts = dict(compile=compile, cuda_graphs=cuda_graphs)
        self.channels_last = channels_last
        self.kernels = kernels
        self.scalable = bool(getattr(model, "scalable", False))
        self._encs = [self.transform(e) for e in (model.encs if self.scalable else [model.enc])]
        self._hyper_enc = self.transform(model.hyper_enc)
        self._dec = self.transform(model.dec)
        self.hyper_dec = FastExactNet(model.hyper_dec, dev, cuda_graphs=cuda_graphs)
        self.fusion = FastExactNet(model.y_prior_fusion, dev, cuda_graphs=cuda_graphs)
        self.spatial_net = FastExactNet(model.y_spatial_prior, dev, cuda_graphs=cuda_graphs)
        self.synthesis_net = FastExactNet(model.dec, dev, cuda_graphs=cuda_graphs)

    def transform(self, module: nn.Module) -> _Runner:
        """A float runner of ``module`` with this engine's options (any EVC transform or prior network)."""
        if self.impl == "fused":
            return FastTransform(module, self.dtype, self.device, kernels=self.kernels, **self._opts)
        return EagerTransform(module, self.dtype, self.device, channels_last=self.channels_last, **self._opts)

    # -- the interface used by evc.codec -----------------------------------------------------------------------
    def latents(self, xp: torch.Tensor, enc_id: int | None) -> torch.Tensor:
        """Candidate latents (K,B,N,h,w) like ``ReferenceEngine.latents``."""
        if not self.scalable:
            return self._encs[0](xp).unsqueeze(0)
        last = len(self._encs) - 1 if enc_id is None else int(enc_id)
        if not 0 <= last < len(self._encs):
            raise ValueError(f"enc_id must be in 0..{len(self._encs) - 1}, got {enc_id}")
        outs, acc = [], None
        for i in range(last + 1):
            yi = self._encs[i](xp)
            acc = yi if acc is None else acc + yi
            outs.append(acc / (i + 1))
        return outs[-1].unsqueeze(0) if enc_id is not None else torch.stack(outs, 0)

    def hyper_enc(self, y: torch.Tensor) -> torch.Tensor:
        """hyper_enc of y / curr_q, before rounding."""
        return self._hyper_enc(y)

    def prior(self, z_hat64: torch.Tensor) -> torch.Tensor:
        """Exact fusion(hyper_dec(z)) in float64, NCHW (channels-last strides)."""
        return to_nchw(self.fusion.nhwc(self.hyper_dec.nhwc(to_nhwc(z_hat64))))

    def spatial(self, inp: torch.Tensor) -> torch.Tensor:
        """Exact y_spatial_prior in float64."""
        return self.spatial_net(inp)

    def synthesis(self, y64: torch.Tensor, exact: bool) -> torch.Tensor:
        """Image (before clamping) from the dequantised latent: exact twin, or the float transform."""
        if exact:
            return self.synthesis_net(y64)
        return self._dec(y64)
