"""CPU kernels of the fused float transforms (:mod:`.fused`): 1x1 and KxK convolutions with a fused activation,
and Winograd convolutions for wide 3x3 layers. Activations are NHWC tensors.

Each kernel picks its backend per call from the shape (the thresholds come from ``benchmarks/evc_kernels.py`` on
AVX2 and AVX-512 CPUs with torch 2.13; rerun it to tune them for another CPU):

* 1x1 convolutions go to oneDNN's 1x1 convolution with the bias and the activation fused into its epilogue. On an
  AVX2 CPU only those with many pixels and a wide side (the FFN expansions at high resolution) do: the others stay
  one MKL ``addmm``, faster for the narrow and the low-resolution layers (e.g. everything at 1/16 resolution). On an
  AVX-512 CPU oneDNN is faster from about a thousand pixels on, and in bfloat16 at every size;
* dense 3x3 stride-1 convolutions with >= 128 input and output channels (:class:`Wide3x3`) use Winograd: below
  :data:`NNPACK_MIN_PX` output pixels our F(4x4, 3x3), 4x fewer multiplies in one batched GEMM with the transforms as
  two small GEMMs (faster than oneDNN's direct convolution from 128 channels on, slower at 64, which stays direct);
  from :data:`NNPACK_MIN_PX` on, where our transforms' 36x-wide intermediates no longer fit in cache, NNPACK's
  transform-domain convolution (shipped in the torch CPU wheel, algorithm chosen by NNPACK; NCHW, so the
  activations are transposed in and out in cache-sized blocks);
* every other convolution is oneDNN's, again with the activation fused.

bfloat16 takes the oneDNN kernels (no Winograd) where the CPU computes it natively (AVX512_BF16 or AMX, see
:func:`native_bf16`). Anywhere else (CUDA, float16, bfloat16 without native support, a torch build without oneDNN)
the kernels fall back to plain ATen calls with the same results up to float rounding. Winograd's rounding error is
larger than a direct convolution's (relative error ~1e-5 instead of ~1e-6): only the float transforms use it, never
the exact entropy-parameter networks.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from ...hostinfo import cpu_features

__all__ = ["Act", "onednn_ok", "nnpack_ok", "native_bf16", "native_fp16", "apply_act_", "Pointwise", "ConvKxK",
           "Winograd3x3", "NNPACK3x3", "Wide3x3", "use_winograd", "nhwc_to_nchw", "nchw_to_nhwc"]

#: this CPU's vector extensions (:func:`~maskdecay_examples.hostinfo.cpu_features`), read once at import
_CPU_FEATURES = frozenset(cpu_features())

#: an activation: None (identity), "relu", or the negative slope of a LeakyReLU
Act = Union[None, str, float]

#: 1x1 layers go to oneDNN from this many pixels on when one side has >= _ONEDNN_WIDE channels, and always from
#: _ONEDNN_ALWAYS pixels on
_ONEDNN_MIN_PX = 16384
_ONEDNN_ALWAYS = 65536
_ONEDNN_WIDE = 256
#: on CPUs with AVX-512, oneDNN for every 1x1 layer (float32) from _ONEDNN_MIN_PX_AVX512 pixels on: faster than MKL's
#: addmm there, slower for the hyper networks' layers at a few hundred pixels (on AVX2 CPUs addmm is faster below the
#: thresholds above). Read at call time (tests switch it).
_ONEDNN_ANY_SIZE = "avx512f" in _CPU_FEATURES
_ONEDNN_MIN_PX_AVX512 = 1024
#: Winograd for dense 3x3 stride-1 convolutions with at least this many input and output channels
WINOGRAD_MIN_CHANNELS = 128
#: from this many output pixels on, wide 3x3 convolutions go to NNPACK (where available; oneDNN's direct convolution
#: otherwise): below it our F(4x4) is faster, above it NNPACK (benchmarks/evc_kernels.py times all three routes)
NNPACK_MIN_PX = 16384


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX-BF16, read from /proc/cpuinfo by
    :func:`~maskdecay_examples.hostinfo.cpu_features`). Without them oneDNN and ATen emulate bfloat16, slower than
    float32."""
    return bool({"avx512_bf16", "amx_bf16"} & _CPU_FEATURES)


def native_fp16() -> bool:
    """Whether this CPU has float16 arithmetic instructions (AVX512_FP16 or AMX-FP16). Without them float16 on the
    CPU is emulated, several times slower than float32."""
    return bool({"avx512_fp16", "amx_fp16"} & _CPU_FEATURES)


def onednn_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused oneDNN convolution op can run here: CPU, torch built with oneDNN, float32 or bfloat16 on a
    CPU with native bfloat16 (:func:`native_bf16`)."""
    return (device.type == "cpu" and (dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16()))
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def nnpack_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether NNPACK's convolution can run here: CPU, float32, NNPACK in this torch build and usable on this CPU,
    and not switched off by the user (``torch.backends.nnpack.set_flags(False)``; read when a transform is built).
    ``torch._nnpack_available()`` also initialises NNPACK: its convolution fails until that has been called."""
    available = getattr(torch, "_nnpack_available", None)
    enabled = getattr(torch._C, "_get_nnpack_enabled", lambda: True)
    return (device.type == "cpu" and dtype == torch.float32 and available is not None and bool(available())
            and bool(enabled()))


def _block(n: int) -> int:
    for b in (256, 128, 64, 32, 16, 8, 4, 2):
        if n % b == 0:
            return b
    return 1


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> contiguous (N, C, H, W) in two cache-friendly passes: (b x C) blocks of pixels are transposed
    first, then whole b-pixel runs are moved (ATen's one-pass permuted copy strides through memory, several times
    slower for large images)."""
    n, h, w, c = x.shape
    hw = h * w
    b = _block(hw)
    t = x.reshape(n, hw // b, b, c).transpose(2, 3).contiguous()  # (N, HW/b, C, b)
    return t.transpose(1, 2).contiguous().view(n, c, h, w)


def nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, H, W, C), the inverse of :func:`nhwc_to_nchw` (also in two blocked passes)."""
    n, c, h, w = x.shape
    hw = h * w
    b = _block(hw)
    t = x.reshape(n, c, hw // b, b).transpose(1, 2).contiguous()  # (N, HW/b, C, b)
    return t.transpose(2, 3).contiguous().view(n, h, w, c)


def apply_act_(x: torch.Tensor, act: Act) -> torch.Tensor:
    """In-place activation."""
    if act is None:
        return x
    if act == "relu":
        return torch.relu_(x)
    return F.leaky_relu_(x, float(act))


def _attr(act: Act) -> tuple[str, list[float]]:
    if act is None:
        return "none", []
    if act == "relu":
        return "relu", []
    return "leaky_relu", [float(act)]


def _onednn_conv(x_nchw_cl: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: list[int],
                 stride: list[int], groups: int, act: Act) -> torch.Tensor:
    attr, scalars = _attr(act)
    return torch.ops.mkldnn._convolution_pointwise(x_nchw_cl, w, b, padding, stride, [1, 1], groups, attr, scalars,
                                                   "")


class Pointwise:
    """``act(x @ w.T + b)`` over the last dimension of x (a 1x1 convolution of NHWC rows).

    Args:
        w: (out, in) weight; b: (out,) bias; act: the activation; onednn: allow the oneDNN path (see the module
        docstring for when it is taken)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, act: Act = None, onednn: bool = False) -> None:
        self.w, self.b, self.act = w.contiguous(), b.contiguous(), act
        self.wt = self.w.t()
        self.out_channels, self.in_channels = w.shape
        self.w4 = self.w.view(*w.shape, 1, 1).contiguous(memory_format=torch.channels_last) if onednn else None

    def uses_onednn(self, pixels: int) -> bool:
        """Whether a call on ``pixels`` rows takes the oneDNN path."""
        if self.w4 is None:
            return False
        if self.w.dtype == torch.bfloat16:
            return True
        if _ONEDNN_ANY_SIZE:
            return pixels >= _ONEDNN_MIN_PX_AVX512
        wide = max(self.in_channels, self.out_channels) >= _ONEDNN_WIDE
        return pixels >= _ONEDNN_MIN_PX and (wide or pixels >= _ONEDNN_ALWAYS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_channels)
        n = rows.shape[0]
        if self.uses_onednn(n):
            rows = rows.contiguous()  # a no-op except for column slices
            # (n, C) rows as a channels-last (1, C, n, 1) image: oneDNN's 1x1 convolution with fused epilogue
            y = _onednn_conv(rows.view(1, n, 1, self.in_channels).permute(0, 3, 1, 2), self.w4, self.b, [0, 0],
                             [1, 1], 1, self.act)
            return y.permute(0, 2, 3, 1).reshape(*lead, self.out_channels)
        return apply_act_(torch.addmm(self.b, rows, self.wt), self.act).view(*lead, self.out_channels)


class ConvKxK:
    """A convolution with a fused activation on NHWC tensors: oneDNN with the activation in its epilogue where
    available, else ``F.conv2d`` on a channels-last view plus an in-place activation."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                 groups: int, act: Act = None, onednn: bool = False) -> None:
        self.w = w.contiguous(memory_format=torch.channels_last)
        self.b, self.act, self.groups = b, act, groups
        self.stride, self.padding = list(stride), list(padding)
        self.onednn = onednn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xv = x.contiguous().permute(0, 3, 1, 2)  # a channels-last view (the copy happens only for strided input)
        if self.onednn:
            y = _onednn_conv(xv, self.w, self.b, self.padding, self.stride, self.groups, self.act)
        else:
            y = apply_act_(F.conv2d(xv, self.w, self.b, self.stride, self.padding, 1, self.groups), self.act)
        return y.permute(0, 2, 3, 1).contiguous()  # a no-op copy when the kernel returned channels-last


def _winograd_matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B^T (6x6), G (6x3), A^T (4x6) of F(4x4, 3x3) with the interpolation points 0, +-1, +-2, inf (Lavin & Gray,
    "Fast Algorithms for Convolutional Neural Networks", 2016), float64."""
    bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    return tuple(torch.tensor(m, dtype=torch.float64) for m in (bt, g, at))  # type: ignore[return-value]


def use_winograd(conv: torch.nn.Conv2d, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`Winograd3x3` replaces this convolution (CPU float32, dense 3x3, stride 1, padding 1, no
    dilation, >= WINOGRAD_MIN_CHANNELS channels on both sides)."""
    return (device.type == "cpu" and dtype == torch.float32 and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS)


class Winograd3x3:
    """Dense 3x3 'same' convolution (stride 1) by Winograd F(4x4, 3x3) on NHWC tensors.

    Per 4x4 output tile: the 6x6 input tile d is transformed to B^T d B, multiplied channel-wise by the transformed
    filters G g G^T (36 independent (tiles x C_in) @ (C_in x C_out) GEMMs, one ``bmm``), and transformed back with
    A^T (.) A. The tile transforms are applied as one GEMM each with the Kronecker products (B^T (x) B^T, 36x36, and
    A^T (x) A^T, 16x36) on the (36, tiles x channels) layout that the ``bmm`` reads and writes, so no step needs a
    transposition. The filters are transformed once, in float64."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, act: Act = None) -> None:
        bt, g, at = _winograd_matrices()
        cout, cin = w.shape[:2]
        u = torch.einsum("ay,ocyx,bx->abco", g, w.detach().to(torch.float64), g)
        self.u = u.reshape(36, cin, cout).to(w.dtype).contiguous()
        self.bb = torch.kron(bt, bt).to(w.dtype)
        self.aa = torch.kron(at, at).to(w.dtype)
        self.b = b
        self.act = act
        self.cin, self.cout = cin, cout

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bsz, h, w, c = x.shape
        th, tw = -(-h // 4), -(-w // 4)
        xp = F.pad(x, (0, 0, 1, tw * 4 + 1 - w, 1, th * 4 + 1 - h))
        sb, sh, sw, _ = xp.stride()
        tiles = xp.as_strided((6, 6, bsz, th, tw, c), (sh, sw, sb, 4 * sh, 4 * sw, 1))
        v = torch.mm(self.bb, tiles.reshape(36, -1))
        p = bsz * th * tw
        m = torch.bmm(v.view(36, p, c), self.u)
        y = torch.mm(self.aa, m.view(36, -1))
        out = y.view(4, 4, bsz, th, tw, self.cout).permute(2, 3, 0, 4, 1, 5).reshape(bsz, th * 4, tw * 4, self.cout)
        if th * 4 != h or tw * 4 != w:
            out = out[:, :h, :w]
        res = torch.empty(bsz, h, w, self.cout, dtype=x.dtype, device=x.device)
        if self.b is not None:
            torch.add(out, self.b, out=res)  # the scatter back to NHWC and the bias in one pass
        else:
            res.copy_(out)
        return apply_act_(res, self.act)


class NNPACK3x3:
    """Dense 3x3 'same' stride-1 convolution through NNPACK (``torch._nnpack_spatial_convolution``; NNPACK picks
    its fast transform-domain algorithm) on NHWC tensors: blocked transposes to NCHW and back
    (:func:`nhwc_to_nchw`). Call only where :func:`nnpack_ok` holds. Relative error ~1e-5 against a direct
    convolution, like :class:`Winograd3x3`."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, act: Act = None) -> None:
        self.w = w.contiguous()
        self.b = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        self.act = act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._nnpack_spatial_convolution(nhwc_to_nchw(x), self.w, self.b, [1, 1])
        return apply_act_(nchw_to_nhwc(y), self.act)


class Wide3x3:
    """A wide dense 3x3 stride-1 convolution (see :func:`use_winograd`) with the backend chosen per call from the
    number of output pixels: below :data:`NNPACK_MIN_PX` our :class:`Winograd3x3`; from there on
    :class:`NNPACK3x3`, or oneDNN's direct convolution (:class:`ConvKxK`) where NNPACK is unavailable (our F(4x4)
    loses to both at those sizes)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, act: Act = None, onednn: bool = False,
                 nnpack: bool = False) -> None:
        self.winograd = Winograd3x3(w, b, act)
        self.large = NNPACK3x3(w, b, act) if nnpack else ConvKxK(w, b, (1, 1), (1, 1), 1, act, onednn=onednn)

    def backend(self, pixels: int) -> Winograd3x3 | NNPACK3x3 | ConvKxK:
        """The kernel a call with ``pixels`` output pixels per image takes."""
        return self.large if pixels >= NNPACK_MIN_PX else self.winograd

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(x.shape[1] * x.shape[2])(x)
