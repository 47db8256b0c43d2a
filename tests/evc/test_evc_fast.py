"""Fast inference paths (the fast engine) against the reference path: the exact twins are bit-identical, the float
transforms agree within float tolerance, streams are byte-identical where guaranteed and always decode the same,
reduced precision stays decodable; GPU variants run only where CUDA exists."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from maskdecay_examples import evc
from maskdecay_examples.evc.cli.tables import main as table_main
from maskdecay_examples.evc.cli.main import main as cli
from maskdecay_examples.evc.engines.reference import ReferenceEngine
from maskdecay_examples.evc.engines.exact import ExactNet
from maskdecay_examples.evc.coding.entropy import StreamError, SymbolWriter
from maskdecay_examples.evc.engines.fast import FastEngine
from maskdecay_examples.evc.engines.fast_exact import FastExactNet
from maskdecay_examples.evc.engines.fused import EagerTransform, FastTransform
from maskdecay_examples.evc.training.metrics import psnr

NO_CUDA = "no CUDA device in this environment: the GPU variant of this fast path is not exercised"


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return evc.build_model("mini_EVC_SS").eval()


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


@pytest.mark.parametrize("name,cin_mult,down", [("hyper_dec", 1, 4), ("y_prior_fusion", 1, 1),
                                                ("y_spatial_prior", 4, 1), ("dec", 1, 1)])
def test_fast_exact_twin_is_bit_identical(mini, name, cin_mult, down):
    """FastExactNet == ExactNet exactly, for a batch of 2, with 1 and 2 threads (and the batch split)."""
    mod = getattr(mini, name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cin_mult * mini.N, 8 // down if down > 1 else 6, 10 // down if down > 1 else 7,
                    generator=g, dtype=torch.float64) * 3
    if name == "hyper_dec":
        x = x.round()
    ref = ExactNet(mod)(x)
    fast = FastExactNet(mod)
    assert torch.equal(fast(x), ref)
    torch.set_num_threads(2)
    try:
        assert torch.equal(fast(x), ref)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(torch.cat([fast(x[:1]), fast(x[1:])]), ref)
    assert torch.equal(FastExactNet(mod, band_bytes=2048)(x), ref)  # banded evaluation (tiny bands)


def test_exact_gemm_weights_are_column_major():
    """The exact GEMMs take B as the transpose of a contiguous (out, in) matrix, the layout in which MKL's dgemm
    measured faster (docs/performance.md §3.8); the values are the same either way (bit identity: above)."""
    from maskdecay_examples.evc.engines.fast_exact import _XConv3, _XLin

    lin = _XLin([torch.nn.Conv2d(8, 5, 1)], torch.device("cpu"))
    assert lin.wqt.shape == (8, 5) and lin.wqt.t().is_contiguous() and not lin.wqt.is_contiguous()
    conv = _XConv3(torch.nn.Conv2d(8, 5, 3, padding=1), torch.device("cpu"), 1 << 20)
    assert all(t.shape == (8, 5) and t.t().is_contiguous() and not t.is_contiguous() for t in conv.taps)


def test_fast_exact_twin_folds_weight_scales_only_where_exact(mini):
    """The twin folds each row's power-of-two weight scale into the integer weights (one pass less per layer) only
    while that stays exact; with weights scaled into the subnormal range it keeps the scales separate, and both
    ways stay bit-identical to ExactNet."""
    import copy

    from maskdecay_examples.evc.engines.exact import pow2
    from maskdecay_examples.evc.engines.fast_exact import _fold_scales

    wq = torch.tensor([[3.0, -5.0], [7.0, 1.0]], dtype=torch.float64)
    folded, rest = _fold_scales(wq, torch.tensor([-30, 4]))
    assert rest is None and torch.equal(folded, wq * torch.tensor([[2.0 ** -30], [16.0]], dtype=torch.float64))
    kept, rest = _fold_scales(wq, torch.tensor([-1040, 0]))
    assert torch.equal(kept, wq) and rest is not None and torch.equal(rest, pow2(torch.tensor([-1040, 0])))
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, mini.N, 5, 6, generator=g, dtype=torch.float64) * 3).round()
    tiny = copy.deepcopy(mini.y_prior_fusion)
    with torch.no_grad():
        for conv in (tiny[0].block[0].conv1[0], tiny[0].block[0].depth_conv, tiny[0].block[1].conv[0]):
            conv.weight.mul_(2.0 ** -1030)  # rows land below 2^-1022: those layers keep the scales separate
    for net in (mini.y_prior_fusion, tiny):
        assert torch.equal(FastExactNet(net)(x), ExactNet(net)(x))


@pytest.mark.parametrize("name", ["enc", "hyper_enc", "dec"])
def test_fast_transform_matches_eager(mini, name):
    """Fused NHWC float32 transform vs the module: relative max error < 1e-5 (float32 noise)."""
    mod = getattr(mini, name)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 64, 128, generator=g) if name == "enc" else torch.randn(1, mini.N, 4, 8, generator=g)
    with torch.no_grad():
        ref = mod(x)
        out = FastTransform(mod, band_bytes=4096)(x)  # small bands: exercise the banded tail + FFN
        eager_cl = EagerTransform(mod, channels_last=True)(x)
    scale = ref.abs().max()
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5 * scale
    assert (eager_cl - ref).abs().max() <= 1e-5 * scale


def test_memory_bands_at_any_thread_count(mini, monkeypatch):
    """Above _MEMORY_BAND_LIMIT the per-pixel tail + FFN, and the upsampling blocks' GEMM + pixel shuffle, run in
    bands whatever the thread count (large images); the result is the unbanded one up to float32 noise."""
    from maskdecay_examples.evc.engines import fused

    x = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(3))
    y = torch.randn(2, mini.N, 3, 5, generator=torch.Generator().manual_seed(4))  # batch 2, odd sizes
    with torch.no_grad():
        whole = FastTransform(mini.enc)(x)
        whole_dec = FastTransform(mini.dec)(y)
        shuffled: list[int] = []
        real = fused.shuffled_banded

        def spy_shuffle(*args):
            shuffled.append(args[-1])  # band_h
            return real(*args)
        monkeypatch.setattr(fused, "shuffled_banded", spy_shuffle)
        monkeypatch.setattr(fused, "_MEMORY_BAND_LIMIT", 1 << 12)
        monkeypatch.setattr(fused, "_MEMORY_BAND_BYTES", 1 << 12)
        calls: list[tuple[int, int]] = []
        band_px = fused.FloatBuilder._band_px

        def spy(self, n: int, widest: int) -> int:
            calls.append((n, band_px(self, n, widest)))
            return calls[-1][1]
        monkeypatch.setattr(fused.FloatBuilder, "_band_px", spy)
        banded = FastTransform(mini.enc)(x)
        banded_dec = FastTransform(mini.dec)(y)
    assert (2048, 256) in calls  # the half-resolution layer in bands of 256 pixels (the floor)
    assert (banded - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert shuffled and min(shuffled) == 1  # the upsampling blocks: bands of one input row
    assert (banded_dec - whole_dec).abs().max() <= 1e-5 * whole_dec.abs().max()


def _symbols(model, x, rate, engine):
    return evc.reconstruct(model, x, rate, engine=engine)["y_hat"]


def test_codec_fast_engine_streams_and_decoding(mini):
    """Decoding: every engine decodes every stream to the same image (exact synthesis). Encoding: the eager fast
    engine writes byte-identical streams; the fused one differs from the reference at most by float-noise rounding
    flips (none on this input), and its own encoder, reconstruct and decoder agree exactly."""
    x = _image(70, 45 * 2)
    rate = evc.select_rate(mini, q=0.4)
    ref = ReferenceEngine(mini)
    fused = FastEngine(mini)
    eager = FastEngine(mini, impl="eager")
    s_ref = evc.compress(mini, x, rate).data
    s_fused = evc.compress(mini, x, rate, engine=fused).data
    assert evc.compress(mini, x, rate, engine=eager).data == s_ref
    assert s_fused == s_ref  # holds here; in general only up to rare rounding flips (see engines.fast)
    for s in (s_ref, s_fused):
        d_ref = evc.decompress(mini, s, engine=ref)
        d_fast = evc.decompress(mini, s, engine=fused)
        assert torch.equal(d_ref.x_hat, d_fast.x_hat) and torch.equal(d_ref.y_hat, d_fast.y_hat)
    rec = evc.reconstruct(mini, x, rate, engine=fused)
    assert torch.equal(rec["x_hat"], evc.decompress(mini, s_fused, engine=fused).x_hat)
    y_ref = _symbols(mini, x, rate, ref)
    assert (y_ref != rec["y_hat"]).float().mean() <= 1e-3
    # float synthesis: within float noise of the exact one
    d_float = evc.decompress(mini, s_fused, exact_synthesis=False, engine=fused).x_hat
    assert (d_float - d_ref.x_hat).abs().max() < 1e-4


def test_reduced_precision_stays_decodable(mini):
    """bf16 float transforms (the CPU-testable stand-in for the GPU fp16/bf16 path): the stream decodes with the
    float32 reference engine to what the bf16 engine's own decoder produces (the entropy parameters are exact in
    every engine), and the bf16 float synthesis is close to the float32 one."""
    x = _image(64, 64, seed=3)
    rate = evc.select_rate(mini, rate_index=2)
    bf = FastEngine(mini, dtype=torch.bfloat16)
    s = evc.compress(mini, x, rate, engine=bf).data
    d_ref = evc.decompress(mini, s).x_hat
    assert torch.equal(evc.decompress(mini, s, engine=bf).x_hat, d_ref)
    y64 = evc.decompress(mini, s).y_hat
    curr_q = torch.clamp_min(mini.q_basic.detach().double(), 0.5) * rate.q_scale
    x32 = FastEngine(mini).synthesis(y64 * curr_q, exact=False).clamp(0, 1)
    xbf = bf.synthesis(y64 * curr_q, exact=False).clamp(0, 1)
    assert psnr(xbf, x32) > 35.0  # bf16 has 8 mantissa bits; the difference is far below coding noise


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_a_cpu_without_it_warns(monkeypatch, caplog, mini, dtype):
    """An emulated fp16/bf16 is slower than float32 on the CPU: the engine says so (and only then)."""
    from maskdecay_examples.evc.engines import fast

    for native in (True, False):
        monkeypatch.setattr(fast, "native_bf16", lambda: native)
        monkeypatch.setattr(fast, "native_fp16", lambda: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="maskdecay_examples.evc.engines.fast"):
            FastEngine(mini, dtype=dtype)
        assert ("emulated" in caplog.text) == (not native)


def test_engine_rejects_changed_weights(mini):
    m = evc.build_model("mini_EVC_SS").eval()
    eng = FastEngine(m)
    with torch.no_grad():
        m.dec[0].block[0].conv1[0].bias.add_(1.0)
    with pytest.raises(ValueError, match="rebuild"):
        evc.compress(m, _image(64, 64), evc.select_rate(m), engine=eng)
    with pytest.raises(ValueError, match="rebuild"):
        evc.compress(mini, _image(64, 64), evc.select_rate(mini), engine=eng)


def test_scalable_fast_engine_roundtrip():
    torch.manual_seed(0)
    m = evc.build_model("mini_Scale_EVC_SS").eval()
    x = _image(64, 64, seed=4)
    rate = evc.select_rate(m, rate_index=1)
    eng = FastEngine(m)
    res = evc.compress(m, x, rate, engine=eng)
    assert torch.equal(evc.decompress(m, res.data).x_hat, evc.reconstruct(m, x, rate, engine=eng)["x_hat"])


def test_cli_fast_and_reference_decode_identically(tmp_path, mini):
    p = tmp_path / "m.pt"
    evc.save_model(mini, p)
    img = tmp_path / "in.png"
    evc.save_image(img, _image(48, 80, seed=5))
    s1, s2 = tmp_path / "a.evc", tmp_path / "b.evc"
    assert cli(["encode", str(img), str(s1), "--model", str(p), "--q", "0.5"]) == 0
    assert cli(["encode", str(img), str(s2), "--model", str(p), "--q", "0.5", "--reference"]) == 0
    assert s1.read_bytes() == s2.read_bytes()
    o1, o2 = tmp_path / "a.png", tmp_path / "b.png"
    assert cli(["decode", str(s1), str(o1), "--model", str(p)]) == 0
    assert cli(["decode", str(s1), str(o2), "--model", str(p), "--reference"]) == 0
    assert o1.read_bytes() == o2.read_bytes()
    s3, o3 = tmp_path / "c.evc", tmp_path / "c.png"  # --low-memory changes the allocator, never the result
    assert cli(["encode", str(img), str(s3), "--model", str(p), "--q", "0.5", "--low-memory"]) == 0
    assert cli(["decode", str(s3), str(o3), "--model", str(p), "--low-memory"]) == 0
    assert s3.read_bytes() == s1.read_bytes() and o3.read_bytes() == o1.read_bytes()


def test_cli_cuda_graphs_flag_is_checked(tmp_path, mini, capsys):
    """--cuda-graphs: fast path on CUDA only, with a one-line error otherwise."""
    p = tmp_path / "m.pt"
    evc.save_model(mini, p)
    img = tmp_path / "in.png"
    evc.save_image(img, _image(32, 32, seed=8))
    out = tmp_path / "a.evc"
    assert cli(["encode", str(img), str(out), "--model", str(p), "--cuda-graphs"]) == 1
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err
    assert cli(["encode", str(img), str(out), "--model", str(p), "--cuda-graphs", "--reference"]) == 1
    assert "not to --reference" in capsys.readouterr().err
    assert not out.exists()


def test_bench_fast_cli(tmp_path, capsys):
    j = tmp_path / "b.json"
    assert cli(["bench", "--arch", "mini_EVC_SS", "--size", "64x64", "--runs", "1", "--warmup", "0",
                "--stages", "forward,encode,decode", "--threads", "1", "--json", str(j)]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "streams identical: yes" in out
    d = json.loads(j.read_text())
    assert set(d["results"]) == {"reference", "fast"}
    for k in ("forward", "encode", "decode", "codec_networks", "enc_entropy_coding"):
        assert d["results"]["fast"][k]["median_s"] > 0 and k in d["speedup"]
    assert d["streams_identical"] and d["cross_decode_identical"]
    assert len(d["machine"]["loadavg_before"]) == 3
    feats = d["machine"]["cpu_features"]
    assert d["machine"]["cpu"] and f"({d['machine']['cpu']}{' [' + ' '.join(feats) + ']' if feats else ''}, " in out
    assert d["machine"]["sgemm_gflops_before"] > 0 and d["machine"]["sgemm_gflops_after"] > 0
    assert "sgemm 1024^2 before" in out and "anon_huge_pages_mb" in d["machine"]
    assert d["config"]["kernels"] is True and d["config"]["impl"] == "fused"
    assert set(d["machine"]["cpu_kernels"]) == {"onednn", "nnpack"} and "CPU kernels: oneDNN" in out
    # the markdown row of docs/performance.md, from the saved JSON
    assert table_main([str(j), str(j)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 4 and table[0].startswith("| variant | size |") and set(table[1]) == set("|-")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:2] == ["mini_EVC_SS", "64x64"] and cells[-2] == "yes" and len(cells) == table[0].count("|") - 1
    assert float(cells[-1]) * 1024 == pytest.approx(d["machine"]["peak_rss_mb"], abs=52) and "peak RSS" in out
    ref, fast = (d["results"][k]["forward"]["median_s"] * 1000 for k in ("reference", "fast"))
    assert cells[7] == f"{ref:,.0f} → {fast:,.0f} ({d['speedup']['forward']:.2f}×)"
    assert cells[11] == "–" and cells[12].endswith(" / –")  # decode-exact was not measured
    bad = tmp_path / "not_bench.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(SystemExit):
        table_main([str(bad)])
    assert "not an evc bench JSON" in capsys.readouterr().err
    assert cli(["bench", "--arch", "mini_EVC_SS", "--size", "64x64", "--runs", "1", "--warmup", "0",
                "--stages", "forward", "--no-reference", "--no-kernels", "--low-memory", "--json", str(j)]) == 0
    out, d = capsys.readouterr().out, json.loads(j.read_text())
    assert "no-kernels" in out and d["config"]["kernels"] is False
    assert "--low-memory" in out and d["config"]["low_memory"] is True and d["config"]["allocator_tuned"] is False
    assert cli(["bench", "--arch", "mini_EVC_SS", "--size", "64x64", "--stages", "nope"]) == 1
    assert "unknown stage" in capsys.readouterr().err


def test_overlapped_entropy_coding_writes_the_same_stream(mini, monkeypatch):
    """compress(overlap=True) codes on a worker thread (the CUDA default): same bytes, estimates and symbol count as
    inline coding, its CPU time reported, and an error raised on the thread reaches the caller."""
    x = _image(64, 128, seed=8)
    rate = evc.select_rate(mini, rate_index=3)
    eng = FastEngine(mini)
    inline = evc.compress(mini, x, rate, engine=eng)
    over = evc.compress(mini, x, rate, engine=eng, overlap=True)
    assert over.data == inline.data and over.num_symbols == inline.num_symbols
    assert over.est_bits == inline.est_bits and over.ideal_bits == inline.ideal_bits
    assert "entropy_coding_cpu" not in inline.times and over.times["entropy_coding_cpu"] > 0
    for r in (inline, over):
        assert r.times["analysis"] + r.times["prior"] + r.times["entropy_coding"] == pytest.approx(r.times["total"])

    def broken(self, values, idx, tables):
        raise StreamError("boom from the coder thread")

    monkeypatch.setattr(SymbolWriter, "write", broken)
    with pytest.raises(StreamError, match="boom from the coder thread"):
        evc.compress(mini, x, rate, engine=eng, overlap=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_overlap_matches_inline_coding(mini):
    """GPU: entropy coding overlapped with the networks (the default on CUDA) writes the inline coder's bytes."""
    m = evc.build_model("mini_EVC_SS").eval()
    m.load_state_dict(mini.state_dict())
    mc = m.to("cuda")
    x = _image(64, 128, seed=9).cuda()
    rate = evc.select_rate(mc, rate_index=3)
    eng = FastEngine(mc, dtype=torch.float16, cuda_graphs=True)
    over = evc.compress(mc, x, rate, engine=eng)
    assert "entropy_coding_cpu" in over.times
    assert over.data == evc.compress(mc, x, rate, engine=eng, overlap=False).data


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_and_graphs(mini, dtype):
    """GPU: fp16/bf16 + CUDA graphs. The entropy parameters are exact on the GPU too, so a GPU stream decodes on the
    CPU reference engine to the same image as on the GPU (exact synthesis), and the float synthesis is close."""
    m = evc.build_model("mini_EVC_SS").eval()
    m.load_state_dict(mini.state_dict())
    mc = m.to("cuda")
    x = _image(64, 128, seed=6)
    rate = evc.select_rate(mc, rate_index=3)
    eng = FastEngine(mc, dtype=dtype, cuda_graphs=True)
    s = evc.compress(mc, x.cuda(), rate, engine=eng).data
    gpu = evc.decompress(mc, s, engine=eng).x_hat.cpu()
    cpu = evc.decompress(mini, s).x_hat
    assert torch.equal(gpu, cpu)
    x_float = evc.decompress(mc, s, exact_synthesis=False, engine=eng).x_hat.cpu()
    assert psnr(x_float, cpu) > 35.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graphed_exact_net_is_bit_identical(mini):
    """GPU: the exact networks replayed from CUDA graphs give ExactNet's numbers, for new inputs of a captured shape
    and for other shapes, also when the bounded graph cache evicts (here: one graph kept)."""
    m = evc.build_model("mini_EVC_SS").eval()
    m.load_state_dict(mini.state_dict())
    net = m.y_spatial_prior.to("cuda")
    graphed = FastExactNet(net, cuda_graphs=True)
    graphed._graphs.max_graphs = 1
    g = torch.Generator().manual_seed(7)
    for shape in ((1, 4 * m.N, 6, 8), (1, 4 * m.N, 6, 8), (1, 4 * m.N, 4, 10), (1, 4 * m.N, 6, 8)):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).round().cuda()
        assert torch.equal(graphed(x), ExactNet(net)(x))
    assert len(graphed._graphs._graphs) == 1


def test_bands_are_cpu_only_and_compiled_transforms_get_their_own_cache():
    """Row bands are a CPU cache measure: any other device gets none (on an H200 the banded exact synthesis was 3.5x
    slower). Each compiled transform wraps its function in a code object of its own, so dynamo's per-code recompile
    limit (8) cannot silently leave the ninth (transform, shape) pair of a process uncompiled."""
    from maskdecay_examples.evc.engines.fused import _own_code
    from maskdecay_examples.evc.engines.nhwc import NO_BANDS, bands_on

    assert bands_on(torch.device("cpu"), 1234) == 1234
    assert bands_on(torch.device("cuda", 0), 1234) == NO_BANDS
    fns = [_own_code(lambda x, k=k: x + k) for k in range(3)]
    assert len({id(f.__code__) for f in fns}) == 3  # distinct objects (code objects compare equal by value)
    assert [f(torch.zeros(1)).item() for f in fns] == [0.0, 1.0, 2.0]


def test_tune_allocator_asks_for_huge_pages_unless_told_otherwise(monkeypatch):
    """tune_allocator() sets THP_MEM_ALLOC_ENABLE=1 for PyTorch's CPU allocator, but never overrides a user's
    setting."""
    import os

    from maskdecay_examples.evc.engines.allocator import tune_allocator

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    tune_allocator()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    tune_allocator()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_auto_impl_picks_the_measured_faster_transform_path(mini):
    """impl="auto": fused on the CPU and in reduced precision, eager (cuDNN) for float32 on CUDA; explicit choices
    pass through; the bench records what auto resolved to."""
    from maskdecay_examples.evc.engines.fast import resolve_impl

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_impl("auto", cpu, torch.float32) == "fused"
    assert resolve_impl("auto", cuda, torch.float32) == "eager"
    assert resolve_impl("auto", cuda, torch.float16) == resolve_impl("auto", cuda, torch.bfloat16) == "fused"
    assert resolve_impl("fused", cuda, torch.float32) == "fused" and resolve_impl("eager", cpu, torch.float16) == "eager"
    with pytest.raises(ValueError, match="impl must be"):
        resolve_impl("fast", cpu, torch.float32)
    assert FastEngine(mini).impl == "fused"
