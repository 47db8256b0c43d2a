"""Channels-last (NHWC) building blocks shared by the fused float executor (:mod:`.fused`) and the exact twin
(:mod:`.fast_exact`): layout changes, the NHWC pixel shuffle, pixel/row bands, the walk over an EVC module tree and
CUDA-graph replay."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, NamedTuple, NoReturn, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import (
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
from .exact import chain

__all__ = ["Fn", "NO_BANDS", "use_bands", "bands_on", "to_nhwc", "to_nchw", "ps_rows", "shuffled_view",
           "pixel_shuffle_nhwc", "shuffled_banded", "DepthConvParts", "depth_conv_parts", "ffn_parts", "LayerWalker",
           "GraphCache"]

Fn = Callable[[torch.Tensor], torch.Tensor]

#: a band size no intermediate reaches: bands off
NO_BANDS = 1 << 62


def use_bands(total_bytes: int, band_bytes: int, single_thread_only: bool = True) -> bool:
    """Banding pays only for intermediates well above one band (4 bands; with the default sizes that is beyond a
    32 MiB L3 for the float path) and, on the float path, only single-threaded: with several threads every band is
    an OpenMP region whose threads wait for each other, which costs more than the cache saves. The exact path bands
    at any thread count (``single_thread_only=False``, see :func:`.fast_exact._band`)."""
    return total_bytes > 4 * band_bytes and (not single_thread_only or torch.get_num_threads() == 1)


def bands_on(device: torch.device, band_bytes: int) -> int:
    """``band_bytes`` where bands apply, else a size no intermediate reaches. Bands are a CPU cache measure: on a GPU
    they only multiply kernel launches."""
    return band_bytes if device.type == "cpu" else NO_BANDS


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> contiguous (B,H,W,C)."""
    return x.permute(0, 2, 3, 1).contiguous()


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B,H,W,C) -> (B,C,H,W) view with channels-last strides (no copy)."""
    return x.permute(0, 3, 1, 2)


def ps_rows(r: int, c_out: int) -> torch.Tensor:
    """Row permutation that makes a 1x1 conv with ``r*r*c_out`` outputs emit (i, j, c) order instead of PixelShuffle's
    (c, i, j), so that the NHWC pixel shuffle moves whole channel vectors."""
    return torch.arange(c_out * r * r).view(c_out, r * r).t().reshape(-1)


def shuffled_view(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W, r*r*C) with channels in (i, j, c) order (see :func:`ps_rows`) as the (B, H, r, W, r, C) view whose
    contiguous copy is the pixel-shuffled (B, H*r, W*r, C) tensor."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, r, r, c // (r * r)).permute(0, 1, 3, 2, 4, 5)


def pixel_shuffle_nhwc(x: torch.Tensor, r: int) -> torch.Tensor:
    """NHWC pixel shuffle of a tensor whose channels are in (i, j, c) order (see :func:`ps_rows`)."""
    b, h, w, c = x.shape
    return shuffled_view(x, r).reshape(b, h * r, w * r, c // (r * r))


class DepthConvParts(NamedTuple):
    """The layers of a DepthConv of either flavour; a slope is None where the flavour has no activation."""

    conv1: nn.Conv2d
    s1: float
    dwc: nn.Conv2d
    s_dw: float | None
    conv2: nn.Conv2d
    s2: float | None
    adaptor: nn.Module | None


def depth_conv_parts(m: DepthConv | PriorDepthConv) -> DepthConvParts:
    """Split a DepthConv into its convolutions and activation slopes (the prior flavour has bare dw and 1x1)."""
    if isinstance(m, PriorDepthConv):
        return DepthConvParts(m.conv1[0], m.conv1[1].negative_slope, m.depth_conv, None, m.conv2, None, m.adaptor)
    return DepthConvParts(m.conv1[0], m.conv1[1].negative_slope, m.depth_conv[0], m.depth_conv[1].negative_slope,
                           m.conv2[0], m.conv2[1].negative_slope, m.adaptor)


def ffn_parts(m: ConvFFN | PriorConvFFN) -> tuple[nn.Conv2d, nn.Conv2d, float | None, float | None]:
    """The two 1x1 convolutions of an FFN and the slopes of its two activations (None: ReLU)."""
    if isinstance(m, PriorConvFFN):
        return m.conv[0], m.conv[2], m.conv[1].negative_slope, m.conv[3].negative_slope
    return m.conv[0], m.conv[2], None, None


class LayerWalker(ABC):
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




def shuffled_banded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, r: int, parts: Sequence[int],
                     band_h: int) -> list[torch.Tensor]:
    """``[pixel_shuffle_nhwc(p, r) for p in torch.split(fn(x), parts, -1)]`` without the full-size output of the
    per-pixel ``fn`` (a 1x1 convolution whose channels are in (i, j, c) order): ``fn`` runs on bands of ``band_h``
    whole input rows of one sample, and each band's shuffled rows are one contiguous slab of every output (input row
    h becomes output rows h*r .. h*r+r-1). Saves a tensor twice the size of the block's output (over a GB in
    float64 in EVC_LL's last upsampling block at 1920x1088)."""
    b, h, w, _ = x.shape
    outs = [torch.empty(b, h * r, w * r, c // (r * r), dtype=x.dtype, device=x.device) for c in parts]
    for i in range(b):
        for h0 in range(0, h, band_h):
            h1 = min(h, h0 + band_h)
            t = fn(x[i, h0:h1]).reshape(1, h1 - h0, w, sum(parts))
            for out, part in zip(outs, torch.split(t, list(parts), dim=-1)):
                src = shuffled_view(part, r)
                out[i:i + 1, h0 * r:h1 * r].view(src.shape).copy_(src)  # the slab of output rows h0*r .. h1*r-1
    return outs


class GraphCache:
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
    def if_wanted(cls, wanted: bool, device: torch.device, run: Fn) -> "GraphCache | None":
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
