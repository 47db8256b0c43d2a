"""CPU kernels of the fused float transforms (engines.kernels): Winograd F(4x4,3x3), NNPACK, the oneDNN 1x1/KxK
convolutions with fused activations and their ATen fallbacks agree with ``F.conv2d`` to float tolerance, on odd
sizes, batches and every activation; the shape rules route as documented; the fused transforms still match the eager
modules with every kernel forced on."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskdecay_examples import evc
from maskdecay_examples.hostinfo import cpu_features
from maskdecay_examples.evc.engines import kernels
from maskdecay_examples.evc.engines.fused import FastTransform
from maskdecay_examples.evc.engines.kernels import (ConvKxK, NNPACK3x3, Pointwise, Wide3x3, Winograd3x3, nchw_to_nhwc, nhwc_to_nchw, nnpack_ok,
                         onednn_ok, use_winograd)

CPU32 = (torch.device("cpu"), torch.float32)
NEEDS_ONEDNN = pytest.mark.skipif(not onednn_ok(*CPU32), reason="torch built without oneDNN: fallback only")
NEEDS_BF16 = pytest.mark.skipif(not onednn_ok(torch.device("cpu"), torch.bfloat16),
                                reason="oneDNN's bf16 kernels need a CPU with native bf16 (AVX512_BF16 or AMX)")
NEEDS_NNPACK = pytest.mark.skipif(not nnpack_ok(*CPU32), reason="NNPACK not available in this torch build / CPU")


def _act_ref(y: torch.Tensor, act) -> torch.Tensor:
    if act is None:
        return y
    return torch.relu(y) if act == "relu" else F.leaky_relu(y, act)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kernel", [Winograd3x3, pytest.param(NNPACK3x3, marks=NEEDS_NNPACK)])
@pytest.mark.parametrize("bsz,h,w,bias,act", [(1, 13, 18, True, None), (2, 8, 8, False, 0.1), (1, 5, 21, True, "relu")])
def test_winograd_kernels_match_conv2d(kernel, bsz, h, w, bias, act):
    """Our F(4x4,3x3) and NNPACK (through the blocked NHWC<->NCHW transposes) vs a direct convolution: sizes not
    multiple of 4 (the transposes fall back to small blocks), batch 2, no bias, all activations, a non-contiguous
    input; relative max error below 1e-4 (float32 Winograd is ~1e-5)."""
    g = torch.Generator().manual_seed(0)
    cin, cout = 24, 40
    x = torch.randn(bsz, h, w + 1, cin, generator=g)[:, :, 1:]
    wt = torch.randn(cout, cin, 3, 3, generator=g) / math.sqrt(9 * cin)
    b = torch.randn(cout, generator=g) if bias else None
    ref = _act_ref(F.conv2d(x.permute(0, 3, 1, 2), wt, b, 1, 1), act).permute(0, 2, 3, 1)
    out = kernel(wt, b, act)(x)
    assert out.shape == ref.shape and out.is_contiguous()
    assert _rel(out, ref) < 1e-4


@NEEDS_NNPACK
def test_nnpack_respects_torch_flag():
    """torch.backends.nnpack.set_flags(False) switches our NNPACK route off (oneDNN/ATen take those layers)."""
    with torch.backends.nnpack.flags(enabled=False):
        assert not nnpack_ok(*CPU32)
    assert nnpack_ok(*CPU32)
    assert not nnpack_ok(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 16, 24, 5), (2, 7, 9, 3), (1, 1, 1, 2)])
def test_blocked_transposes(shape):
    """The two-pass transposes are exact permutations, whatever block size the pixel count allows."""
    x = torch.randn(shape)
    y = nhwc_to_nchw(x)
    assert y.is_contiguous() and torch.equal(y, x.permute(0, 3, 1, 2))
    assert torch.equal(nchw_to_nhwc(y), x)


@pytest.mark.parametrize("nnpack", [False, pytest.param(True, marks=NEEDS_NNPACK)])
def test_wide3x3_routing(monkeypatch, nnpack):
    """Our Winograd below NNPACK_MIN_PX output pixels, NNPACK (or oneDNN/ATen where NNPACK is missing) from there on;
    every route matches F.conv2d."""
    monkeypatch.setattr(kernels, "NNPACK_MIN_PX", 64)
    g = torch.Generator().manual_seed(5)
    wt, b = torch.randn(16, 16, 3, 3, generator=g) / 12, torch.randn(16, generator=g)
    k = Wide3x3(wt, b, 0.01, onednn=onednn_ok(*CPU32), nnpack=nnpack)
    assert isinstance(k.backend(63), Winograd3x3)
    assert isinstance(k.backend(64), NNPACK3x3 if nnpack else ConvKxK)
    for h, w in ((7, 9), (8, 8)):
        x = torch.randn(1, h, w, 16, generator=g)
        ref = F.leaky_relu(F.conv2d(x.permute(0, 3, 1, 2), wt, b, 1, 1), 0.01).permute(0, 2, 3, 1)
        assert _rel(k(x), ref) < 1e-4


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=NEEDS_ONEDNN)])
@pytest.mark.parametrize("act", [None, "relu", 0.01])
def test_pointwise_paths(monkeypatch, onednn, act):
    """Both routes of a 1x1 layer (oneDNN forced on by lowering the thresholds, and addmm) equal F.linear."""
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_PX", 0)
    monkeypatch.setattr(kernels, "_ONEDNN_ALWAYS", 0)
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_PX_AVX512", 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 7, 16, generator=g)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    p = Pointwise(w, b, act, onednn=onednn)
    assert p.uses_onednn(70) == onednn
    out = p(x)
    assert out.shape == (2, 5, 7, 24) and out.is_contiguous()
    assert _rel(out, _act_ref(F.linear(x, w, b), act)) < 1e-5
    # a non-contiguous input (a strided spatial subsample, as in a downsampling skip)
    xs = x[:, ::2, ::2]
    assert _rel(p(xs), _act_ref(F.linear(xs, w, b), act)) < 1e-5


def test_pointwise_routing_rule(monkeypatch):
    """AVX2 CPUs: oneDNN for many pixels with a wide side, or very many pixels; addmm otherwise. AVX-512 CPUs: oneDNN
    from 1,024 pixels on; bfloat16: at every size. Never without oneDNN."""
    narrow = Pointwise(torch.zeros(64, 64), torch.zeros(64), onednn=True)
    wide = Pointwise(torch.zeros(256, 64), torch.zeros(256), onednn=True)
    monkeypatch.setattr(kernels, "_ONEDNN_ANY_SIZE", False)
    assert not narrow.uses_onednn(1536) and not wide.uses_onednn(1536)
    assert wide.uses_onednn(kernels._ONEDNN_MIN_PX) and not narrow.uses_onednn(kernels._ONEDNN_MIN_PX)
    assert narrow.uses_onednn(kernels._ONEDNN_ALWAYS)
    assert Pointwise(torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(64), onednn=True).uses_onednn(1)
    monkeypatch.setattr(kernels, "_ONEDNN_ANY_SIZE", True)
    assert narrow.uses_onednn(1536) and wide.uses_onednn(1024) and not wide.uses_onednn(384)
    assert not Pointwise(torch.zeros(256, 64), torch.zeros(256), onednn=False).uses_onednn(10 ** 6)


def test_onednn_takes_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    """oneDNN's bf16 kernels need native bf16; float16 always falls back to ATen; the native checks read cpuinfo."""
    feats = set(cpu_features())
    assert kernels.native_bf16() == bool(feats & {"avx512_bf16", "amx_bf16"})
    assert kernels.native_fp16() == bool(feats & {"avx512_fp16", "amx_fp16"})
    cpu = torch.device("cpu")
    assert not onednn_ok(cpu, torch.float16) and not onednn_ok(torch.device("meta"), torch.float32)
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    assert not onednn_ok(cpu, torch.bfloat16)
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    assert onednn_ok(cpu, torch.bfloat16) == onednn_ok(*CPU32)


@NEEDS_BF16
def test_bf16_onednn_kernels_match_conv2d():
    """The oneDNN routes in bfloat16 (1x1 and KxK, fused activation) against float32 F.conv2d: bf16 tolerance."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 9, 11, 32, generator=g)
    w, b = torch.randn(48, 32, generator=g) / 6, torch.randn(48, generator=g)
    p = Pointwise(w.bfloat16(), b.bfloat16(), 0.1, onednn=True)
    assert p.uses_onednn(99)
    out = p(x.bfloat16())
    assert out.dtype == torch.bfloat16 and _rel(out.float(), F.leaky_relu(F.linear(x, w, b), 0.1)) < 2e-2
    w3 = torch.randn(16, 32, 3, 3, generator=g) / 17
    out = ConvKxK(w3.bfloat16(), b[:16].bfloat16(), (1, 1), (1, 1), 1, 0.01, onednn=True)(x.bfloat16())
    ref = F.leaky_relu(F.conv2d(x.permute(0, 3, 1, 2), w3, b[:16], 1, 1), 0.01).permute(0, 2, 3, 1)
    assert out.dtype == torch.bfloat16 and _rel(out.float(), ref) < 2e-2


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=NEEDS_ONEDNN)])
@pytest.mark.parametrize("groups,stride", [(1, 2), (8, 1)])
def test_convkxk_paths(onednn, groups, stride):
    """Dense strided and depthwise 3x3 with fused LeakyReLU, both routes, vs F.conv2d."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 11, 9, 8, generator=g)
    w, b = torch.randn(8, 8 // groups, 3, 3, generator=g), torch.randn(8, generator=g)
    out = ConvKxK(w, b, (stride, stride), (1, 1), groups, 0.1, onednn=onednn)(x)
    ref = F.leaky_relu(F.conv2d(x.permute(0, 3, 1, 2), w, b, stride, 1, 1, groups), 0.1).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and out.is_contiguous()
    assert _rel(out, ref) < 1e-5
    xs = x[:, :, ::2]  # strided input
    ref_s = F.leaky_relu(F.conv2d(xs.permute(0, 3, 1, 2), w, b, stride, 1, 1, groups), 0.1).permute(0, 2, 3, 1)
    assert _rel(ConvKxK(w, b, (stride, stride), (1, 1), groups, 0.1, onednn=onednn)(xs), ref_s) < 1e-5


def test_use_winograd_conditions():
    """Only dense 3x3 stride-1 'same' convolutions, wide enough, on CPU float32."""
    c = kernels.WINOGRAD_MIN_CHANNELS
    assert use_winograd(torch.nn.Conv2d(c, c, 3, padding=1), *CPU32)
    assert not use_winograd(torch.nn.Conv2d(c // 2, c, 3, padding=1), *CPU32)
    assert not use_winograd(torch.nn.Conv2d(c, c, 3, stride=2, padding=1), *CPU32)
    assert not use_winograd(torch.nn.Conv2d(c, c, 3, padding=1, groups=c), *CPU32)
    assert not use_winograd(torch.nn.Conv2d(c, c, 1), *CPU32)
    assert not use_winograd(torch.nn.Conv2d(c, c, 3, padding=1), torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("route", [Winograd3x3, pytest.param(NNPACK3x3, marks=NEEDS_NNPACK)])
@pytest.mark.parametrize("name", ["enc", "dec"])
def test_fast_transform_with_every_kernel(monkeypatch, name, route):
    """The fused transforms with every dense 3x3 stride-1 conv on one Winograd route (ours, or NNPACK) and oneDNN on
    every 1x1 layer (thresholds forced) still match the eager module: relative max error < 1e-4."""
    monkeypatch.setattr(kernels, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kernels, "NNPACK_MIN_PX", 0 if route is NNPACK3x3 else 1 << 40)
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_PX", 0)
    monkeypatch.setattr(kernels, "_ONEDNN_ALWAYS", 0)
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_PX_AVX512", 0)
    calls = []
    route_call = route.__call__
    monkeypatch.setattr(route, "__call__", lambda self, x: calls.append(x.shape) or route_call(self, x))
    torch.manual_seed(0)
    model = evc.build_model("mini_EVC_SS").eval()
    mod = getattr(model, name)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 64, 128, generator=g) if name == "enc" else torch.randn(1, model.N, 4, 8, generator=g)
    with torch.no_grad():
        ref = mod(x)
        out = FastTransform(mod)(x)
    assert calls, f"no convolution took the {route.__name__} path"
    assert _rel(out, ref) < 1e-4
