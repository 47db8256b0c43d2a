"""The fused float executor: EVC float transforms (analysis ``enc``, ``hyper_enc``, the float synthesis ``dec``, or a
prior network in float) evaluated channels-last with weights prepared once, and the eager alternative.

The float transforms feed nothing that the decoder must recompute, so any precision and kernel order is allowed.
:class:`FastTransform` evaluates them channels-last (NHWC) as plain GEMMs (1x1 convolutions become one ``addmm`` on a
(pixels, channels) matrix instead of ATen's im2col path with a broadcast bias copy), oneDNN convolutions for the 3x3
kernels, in-place activations, the two 1x1 branches of an upsampling block merged into one GEMM, the pixel shuffle
folded into a weight-row permutation (a block copy of whole channel vectors), the depthwise bias of the prior-flavour
blocks folded into the next 1x1 bias, and the 4x-wide FFNs evaluated in row bands that stay in cache. On a CPU in
float32 the layers run through the kernels of :mod:`.kernels`, chosen per shape: oneDNN 1x1/KxK convolutions with
the bias and the activation fused into their epilogue, and Winograd for the wide dense 3x3 convolutions
(``kernels=False`` turns them off, for comparisons). ``dtype`` may be float16/bfloat16: on GPUs, and bfloat16 on CPUs
with native bf16 (AVX512_BF16 or AMX, through oneDNN's kernels); on a CPU without native support it is emulated and
slower than float32.
"""
from __future__ import annotations

import copy
import types
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import (ConvFFN, DepthConv, PriorConvFFN, PriorDepthConv, ResidualBlockUpsample,
                             ResidualBlockWithStride)
from .kernels import Act, ConvKxK, Pointwise, Wide3x3, nnpack_ok, onednn_ok, use_winograd
from .nhwc import (NO_BANDS, Fn, GraphCache, LayerWalker, bands_on, depth_conv_parts, ffn_parts, pixel_shuffle_nhwc,
                   ps_rows, shuffled_banded, to_nchw, to_nhwc, use_bands)

__all__ = ["FastTransform", "EagerTransform", "Runner", "FloatBuilder"]


#: band size in bytes of the widest per-pixel intermediate (float path, single-threaded: see :func:`.nhwc.use_bands`)
BAND_BYTES = 1 << 23
#: at any thread count, an intermediate above this many bytes is cut into bands of _MEMORY_BAND_BYTES, to bound the
#: peak memory of large images (EVC_LL's 768-wide FFN intermediate at 1920x1088 is over a GB in one piece); bands this
#: large cost nothing measurable in OpenMP start-up
_MEMORY_BAND_LIMIT = 1 << 29
_MEMORY_BAND_BYTES = 1 << 27


class FloatBuilder(LayerWalker):
    """Turns EVC transform modules into NHWC closures with weights prepared once. ``kernels``: use the CPU kernels
    of :mod:`.kernels` (oneDNN epilogue fusion, Winograd) where they apply."""

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
        bands where :func:`use_bands` says so, memory-bounding ones above ``_MEMORY_BAND_LIMIT``, else one band."""
        per_px = widest * (torch.finfo(self.dtype).bits // 8)
        if use_bands(n * per_px, self.band_bytes):
            return max(256, self.band_bytes // per_px)
        if self.band_bytes != NO_BANDS and n * per_px > _MEMORY_BAND_LIMIT:
            return max(256, _MEMORY_BAND_BYTES // per_px)
        return n

    def ffn_rows(self, m: ConvFFN | PriorConvFFN) -> tuple[Callable[..., torch.Tensor], int]:
        """Per-pixel ``x + act(W2 act(W1 x + b1) + b2)`` on (pixels, C) rows (act = ReLU, or the prior flavour's
        LeakyReLU); returns the function and the hidden width."""
        c1, c2, slope, slope2 = ffn_parts(m)
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
        c1, s1, dwc, s_dw, c2, s2, adaptor = depth_conv_parts(m)
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
        rows = ps_rows(r, cout)
        ws, bs_ = self.lin_params(m.subpel_conv[0], rows)
        wu, bu = self.lin_params(m.upsample[0], rows)
        both = self.pointwise(torch.cat([ws, wu]), torch.cat([bs_, bu]))
        n = ws.shape[0]
        cv = self.conv(m.conv, m.leaky_relu2.negative_slope)
        s1 = m.leaky_relu.negative_slope

        def f(x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            per_row = w * 2 * n * x.element_size()  # bytes of one input row's GEMM output
            if self.band_bytes == NO_BANDS or b * h * per_row <= _MEMORY_BAND_LIMIT:
                t = both(x)
                main = F.leaky_relu_(pixel_shuffle_nhwc(t[..., :n], r), s1)
                skip = pixel_shuffle_nhwc(t[..., n:], r)
            else:  # large images: no full-size pre-shuffle output (see _MEMORY_BAND_LIMIT)
                main, skip = shuffled_banded(both, x, r, (n, n), max(1, _MEMORY_BAND_BYTES // per_row))
                F.leaky_relu_(main, s1)
            return cv(main).add_(skip)
        return f

    def shuffled_conv1x1(self, conv: nn.Conv2d, r: int) -> Fn:
        """The 1x1 conv emits (i, j, c) order, so the NHWC pixel shuffle moves whole channel vectors."""
        p = self.pointwise(*self.lin_params(conv, ps_rows(r, conv.out_channels // (r * r))))
        return lambda x: pixel_shuffle_nhwc(p(x), r)

    def conv2d(self, m: nn.Conv2d) -> Fn:
        """Plain 1x1 convolutions as one GEMM, the others through oneDNN/cuDNN (or Winograd)."""
        if m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1):
            return self.pointwise(*self.lin_params(m))
        return self.conv(m)



class Runner:
    """Common part of the float-transform runners: dtype/device handling, optional CUDA-graph replay."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.device = device
        self.dtype = dtype
        self._graphs = GraphCache.if_wanted(cuda_graphs, device, self._run)

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


class FastTransform(Runner):
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
        kernels: use the CPU kernels of :mod:`.kernels` (oneDNN convolutions with fused epilogues, Winograd) where
            their rules select them; False gives the plain GEMM/oneDNN executor (for comparisons). Off under
            ``compile``.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 compile: bool = False, cuda_graphs: bool = False, band_bytes: int = BAND_BYTES,
                 kernels: bool = True) -> None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        super().__init__(dev, dtype, cuda_graphs)
        # under compile: one graph without Python band loops (inductor fuses the FFN epilogues itself)
        band_bytes = NO_BANDS if compile else bands_on(dev, band_bytes)
        self._fn = FloatBuilder(dtype, dev, band_bytes, kernels=kernels and not compile).module(module)
        if compile:
            self._fn = torch.compile(_own_code(self._fn), dynamic=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(x.to(self.device, self.dtype))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        return to_nchw(out)


class EagerTransform(Runner):
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
