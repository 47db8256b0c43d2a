"""The measurement behind ``evc bench``: speed of the EVC codec, reference path and fast path measured in the same
run, interleaved.

Stages (each timed separately, warm-up first, then ``--runs`` timed repetitions; median and p90):

* ``forward``: one networks-only pass, what the official EVC code timed (encoder, hyper encoder, hyper decoder,
  prior fusion, spatial prior, decoder; float, no entropy coding). Reference: the model's own float32 modules;
  fast: the same networks through the fast float transforms.
* ``encode``: :func:`evc.compress` (analysis, hyper encoder, exact entropy parameters, entropy coding). On CUDA
  the entropy coding runs on a CPU thread while the GPU computes the next entropy parameters: its row is then the
  coding time left on the critical path, and ``entropy coding, CPU time (overlapped)`` its CPU time.
* ``decode``: :func:`evc.decompress` with the float synthesis (``--fast-synthesis``).
* ``decode-exact``: :func:`evc.decompress` with the exact (bit-reproducible) synthesis, the CLI default.

"Networks only" of the codec = encode minus entropy coding plus decode minus entropy decoding. The fast engine
must produce the same entropy parameters; the bench checks that the two encoders wrote the same bytes and that
each decoder decodes the other's stream to the same image.

Timing: ``time.perf_counter`` around synchronised calls on CPU, CUDA events on GPU. The machine load
(``os.getloadavg``) is recorded before and after: on a shared machine compare the two paths by their ratio.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ...hostinfo import cpu_features, cpu_name, peak_rss_mb
from ..coding.codec import compress, decompress, pad_image
from ..coding.rate import select_rate
from ..engines.fast import DTYPES, FastEngine
from ..engines.kernels import nnpack_ok, onednn_ok
from ..engines.reference import ReferenceEngine
from ..models.architectures import checkerboard
from ..models.zoo import build_model
from ..training.metrics import psnr
from .imageio import load_image

__all__ = ["STAGES", "BenchConfig", "run_bench", "synthetic_image", "forward_fn", "forward_macs", "sgemm_probe"]

STAGES = ("forward", "encode", "decode", "decode-exact")


@dataclass
class BenchConfig:
    """What ``evc bench`` measures."""

    arch: str = "EVC_SS"
    width: int = 768
    height: int = 512
    device: str = "cpu"
    dtype: str = "fp32"
    impl: str = "auto"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    kernels: bool = True
    threads: int | None = None
    runs: int = 3
    warmup: int = 1
    rate_index: int = 3
    image: str | None = None
    stages: tuple[str, ...] = STAGES
    reference: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def synthetic_image(w: int, h: int) -> torch.Tensor:
    """A smooth, slightly noisy test image (1,3,h,w) in [0,1] (seeded)."""
    g = torch.Generator().manual_seed(0)
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    base = torch.cat([0.5 + 0.4 * torch.sin(6 * xx + 3 * yy), 0.5 + 0.4 * torch.cos(5 * yy - 2 * xx),
                      0.5 + 0.3 * torch.sin(9 * xx * yy)], 1)
    return (base + 0.03 * torch.randn(1, 3, h, w, generator=g)).clamp(0, 1)


class _Clock:
    """Wall time of a call: perf_counter on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def forward_fn(model: Any, x: torch.Tensor, fast: Any | None) -> Callable[[], torch.Tensor]:
    """One float networks-only pass, as the official code timed it (``EVC.forward`` without the bit estimates):
    enc, hyper_enc, rounding, hyper_dec, fusion, the two-pass dual prior with one spatial-prior call, dec.
    ``fast``: a FastEngine whose float transform is used for every network (None: the model's own modules)."""
    if getattr(model, "scalable", False):
        raise ValueError("the forward stage times single-encoder models only")
    names = ("enc", "hyper_enc", "hyper_dec", "y_prior_fusion", "y_spatial_prior", "dec")
    f = {n: (fast.transform(getattr(model, n)) if fast is not None else getattr(model, n)) for n in names}
    curr_q = model.curr_q(model.q_scale[-1]).detach()

    @torch.inference_mode()
    def run() -> torch.Tensor:
        y = f["enc"](x) / curr_q
        z_hat = torch.round(f["hyper_enc"](y))
        q_step, scales, means = f["y_prior_fusion"](f["hyper_dec"](z_hat)).chunk(3, 1)
        quant_step = torch.clamp_min(q_step, 0.5)
        y0, y1 = (y / quant_step).chunk(2, 1)
        s0, s1 = scales.chunk(2, 1)
        m0, m1 = means.chunk(2, 1)
        mask0, mask1 = checkerboard(y.shape[-2], y.shape[-1], y.device, y.dtype)
        mean_p1 = m0 * mask0 + m1 * mask1
        yhat_p1 = torch.round(y0 * mask0 + y1 * mask1 - mean_p1) + mean_p1
        sp = f["y_spatial_prior"](torch.cat([yhat_p1 * mask0, yhat_p1 * mask1, means, scales, quant_step], 1))
        _, mm0, _, mm1 = sp.chunk(4, 1)
        mean_p2 = mm0 * mask1 + mm1 * mask0
        yhat_p2 = torch.round(y0 * mask1 + y1 * mask0 - mean_p2) + mean_p2
        y_hat = torch.cat([yhat_p1 * mask0 + yhat_p2 * mask1, yhat_p1 * mask1 + yhat_p2 * mask0], 1) * quant_step
        return f["dec"](y_hat * curr_q)
    return run


def forward_macs(model: Any, height: int, width: int) -> int:
    """Multiply-accumulates of one networks-only forward at (padded) height x width: every convolution of enc,
    hyper_enc, hyper_dec, fusion, spatial prior and dec, counted on a 64x64 pass and scaled by the pixel ratio
    (exact: every layer's output size is proportional to the image area at sizes that are multiples of 64)."""
    counts = [0]
    hooks = []

    def hook(mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        counts[0] += out.numel() * mod.weight[0].numel()

    for name in ("enc", "hyper_enc", "hyper_dec", "y_prior_fusion", "y_spatial_prior", "dec"):
        for mod in getattr(model, name).modules():
            if isinstance(mod, torch.nn.Conv2d):
                hooks.append(mod.register_forward_hook(hook))
    try:
        x = torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device)
        forward_fn(model, x, None)()
    finally:
        for h in hooks:
            h.remove()
    return counts[0] * (height * width) // (64 * 64)


def _anon_huge_mb() -> float | None:
    """MB of this process's memory on transparent huge pages (Linux), None where unknown."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _cpu_kernels() -> dict[str, bool]:
    """Which optional CPU backends the fast path's kernels can use in this torch build on this CPU (float32)."""
    cpu32 = (torch.device("cpu"), torch.float32)
    return {"onednn": onednn_ok(*cpu32), "nnpack": nnpack_ok(*cpu32)}


def sgemm_probe(size: int = 1024, reps: int = 5) -> float:
    """The machine's current float32 GEMM rate in GFLOP/s (best of ``reps`` square ``size`` matmuls with torch's
    thread setting): recorded before and after a CPU bench, because a shared host's speed drifts by tens of percent
    within an hour, so absolute times can be read against it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def _pct(v: list[float], p: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def _summary(v: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(v), "p90_s": _pct(v, 90), "runs_s": [round(t, 6) for t in v]}


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure; returns the JSON-ready result (see the module docstring)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device} requested but CUDA is not available")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch).to(dev).eval()
    w, h = cfg.width, cfg.height
    if cfg.image:
        x, _, _ = load_image(cfg.image)
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    else:
        x = synthetic_image(w, h)
    x = x.to(dev)
    rate = select_rate(model, rate_index=cfg.rate_index)
    opts = {"dtype": DTYPES[cfg.dtype], "impl": cfg.impl, "channels_last": cfg.channels_last,
            "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs, "kernels": cfg.kernels}
    t_build = time.perf_counter()
    fast = FastEngine(model, **opts)
    build_s = time.perf_counter() - t_build
    engines: dict[str, Any] = {"fast": fast}
    cfg = replace(cfg, impl=fast.impl)  # what "auto" resolved to
    if cfg.reference:
        engines = {"reference": ReferenceEngine(model), "fast": fast}
    xp = pad_image(x)
    forwards = {name: forward_fn(model, xp, fast if name == "fast" else None)
                for name in engines} if "forward" in cfg.stages else {}
    clock = _Clock(dev)
    streams: dict[str, bytes] = {}
    symbols = 0
    times: dict[str, dict[str, list[float]]] = {name: {} for name in engines}

    def add(name: str, key: str, v: float) -> None:
        times[name].setdefault(key, []).append(v)

    probe_before = sgemm_probe() if dev.type == "cpu" else None
    load_before = os.getloadavg()
    t_first: dict[str, float] = {}
    for it in range(cfg.warmup + cfg.runs):
        timed = it >= cfg.warmup
        for name, eng in engines.items():  # interleaved: reference then fast in every repetition
            if progress:
                progress(f"{'run' if timed else 'warm-up'} {it - cfg.warmup + 1 if timed else it + 1}: {name}")
            if "forward" in cfg.stages:
                t, _ = clock(forwards[name])
                if it == 0:
                    t_first[f"{name}_forward"] = t
                if timed:
                    add(name, "forward", t)
            data = None
            if {"encode", "decode", "decode-exact"} & set(cfg.stages):
                t, r = clock(lambda: compress(model, x, rate, engine=eng))
                data = r.data
                streams[name] = data
                symbols = r.num_symbols
                if timed and "encode" in cfg.stages:
                    add(name, "encode", t)
                    add(name, "enc_analysis", r.times["analysis"])
                    add(name, "enc_entropy_params", r.times["prior"])
                    add(name, "enc_entropy_coding", r.times["entropy_coding"])
                    if "entropy_coding_cpu" in r.times:  # overlapped with the networks (CUDA)
                        add(name, "enc_entropy_coding_cpu", r.times["entropy_coding_cpu"])
                    add(name, "enc_networks", r.times["analysis"] + r.times["prior"])
            for stage, exact in (("decode", False), ("decode-exact", True)):
                if stage not in cfg.stages:
                    continue
                t, d = clock(lambda: decompress(model, data, exact_synthesis=exact, engine=eng))
                if timed:
                    tag = "dec" if not exact else "dec_exact"
                    add(name, stage, t)
                    add(name, f"{tag}_entropy_params", d.times["prior"])
                    add(name, f"{tag}_entropy_coding", d.times["entropy_coding"])
                    add(name, f"{tag}_synthesis", d.times["synthesis"])
                    add(name, f"{tag}_networks", d.times["prior"] + d.times["synthesis"])
        for name in engines:
            tn = times[name]
            if timed and "enc_networks" in tn and "dec_networks" in tn:
                add(name, "codec_networks", tn["enc_networks"][-1] + tn["dec_networks"][-1])
            if timed and "enc_networks" in tn and "dec_exact_networks" in tn:
                add(name, "codec_networks_exact", tn["enc_networks"][-1] + tn["dec_exact_networks"][-1])
    load_after = os.getloadavg()
    probe_after = sgemm_probe() if dev.type == "cpu" else None

    res: dict[str, Any] = {
        "config": {"arch": cfg.arch, "size": f"{w}x{h}", "padded": f"{x.shape[-1] + (-w) % 64}x{h + (-h) % 64}",
                   "device": cfg.device, "dtype": cfg.dtype, "impl": cfg.impl, "channels_last": cfg.channels_last,
                   "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs, "kernels": cfg.kernels,
                   "threads": torch.get_num_threads(),
                   "runs": cfg.runs, "warmup": cfg.warmup, "rate_index": cfg.rate_index,
                   "image": cfg.image or "synthetic", "stages": list(cfg.stages), **cfg.extra},
        "machine": {"cpu": cpu_name(), "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in load_after],
                    "sgemm_gflops_before": probe_before and round(probe_before, 1),
                    "sgemm_gflops_after": probe_after and round(probe_after, 1),
                    "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"), "anon_huge_pages_mb": _anon_huge_mb(),
                    "peak_rss_mb": peak_rss_mb(),
                    "cpu_kernels": _cpu_kernels() if dev.type == "cpu" else None,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "forward_gmac": forward_macs(model, xp.shape[-2], xp.shape[-1]) / 1e9 if "forward" in cfg.stages else None,
        "fast_engine_build_s": round(build_s, 3),
        "first_call_s": {k: round(v, 3) for k, v in t_first.items()},
        "results": {name: {k: _summary(v) for k, v in tv.items()} for name, tv in times.items()},
    }
    if "reference" in times:
        res["speedup"] = {k: res["results"]["reference"][k]["median_s"] / res["results"]["fast"][k]["median_s"]
                          for k in times["fast"] if k in times["reference"]
                          and res["results"]["fast"][k]["median_s"] > 0}
    if streams:
        res.update(_checks(model, x, streams, engines))
    res.update(_flat_summary(res, symbols))
    return res


def _flat_summary(res: dict[str, Any], symbols: int) -> dict[str, float]:
    """Top-level keys for the fast path (what ``evc encode`` / ``evc decode`` run by default): seconds, FPS,
    entropy-coding ns/symbol."""
    r = res["results"]["fast"]
    out: dict[str, float] = {}
    pairs = (("forward_s", "forward"), ("encode_s", "encode"), ("decode_s", "decode-exact"),
             ("decode_fast_s", "decode"), ("enc_entropy_s", "enc_entropy_coding"),
             ("enc_entropy_cpu_s", "enc_entropy_coding_cpu"),
             ("dec_entropy_s", "dec_exact_entropy_coding"), ("codec_networks_s", "codec_networks"))
    for key, stage in pairs:
        if stage in r:
            out[key] = r[stage]["median_s"]
    if "dec_entropy_s" not in out and "dec_entropy_coding" in r:
        out["dec_entropy_s"] = r["dec_entropy_coding"]["median_s"]
    for key, fps in (("encode_s", "encode_fps"), ("decode_s", "decode_fps"), ("decode_fast_s", "decode_fast_fps"),
                     ("forward_s", "forward_fps")):
        if key in out:
            out[fps] = 1.0 / out[key]
    if symbols:
        out["symbols"] = symbols
        for name, key in (("enc_entropy", "enc_entropy_cpu_s" if "enc_entropy_cpu_s" in out else "enc_entropy_s"),
                          ("dec_entropy", "dec_entropy_s")):
            if key in out:
                out[name + "_ns_per_symbol"] = out[key] / symbols * 1e9
    return out


@torch.inference_mode()
def _checks(model: Any, x: torch.Tensor, streams: dict[str, bytes], engines: dict[str, Any]) -> dict[str, Any]:
    """Stream identity, cross decoding, and the float-synthesis error against the exact synthesis."""
    out: dict[str, Any] = {"stream_bytes": {k: len(v) for k, v in streams.items()},
                           "bpp": {k: len(v) * 8 / (x.shape[-1] * x.shape[-2]) for k, v in streams.items()}}
    fast = engines["fast"]
    s_fast = streams["fast"]
    exact_fast = decompress(model, s_fast, engine=fast).x_hat
    float_fast = decompress(model, s_fast, exact_synthesis=False, engine=fast).x_hat
    out["psnr_float_vs_exact_synthesis_db"] = float(psnr(float_fast, exact_fast))
    out["max_abs_float_vs_exact_synthesis"] = float((float_fast - exact_fast).abs().max())
    if "reference" in streams:
        ref = engines["reference"]
        out["streams_identical"] = streams["reference"] == s_fast
        if not out["streams_identical"]:  # where the decoded latents differ (a flipped rounding also moves the
            # spatial-prior means of its neighbours, so this counts flips and their neighbourhoods)
            y_ref = decompress(model, streams["reference"], engine=fast).y_hat
            y_fast = decompress(model, s_fast, engine=fast).y_hat
            out["latents_differing"] = int((y_ref != y_fast).sum())  # type: ignore[operator]
            out["latents_total"] = int(y_ref.numel())  # type: ignore[union-attr]
        exact_ref = decompress(model, s_fast, engine=ref).x_hat
        out["cross_decode_identical"] = bool(torch.equal(exact_ref, exact_fast))
        out["reference_stream_decodes_identically"] = bool(torch.equal(
            decompress(model, streams["reference"], engine=ref).x_hat,
            decompress(model, streams["reference"], engine=fast).x_hat))
    return out
