"""``evc bench``: speed of the EVC codec, reference path and fast path measured in the same run, interleaved.

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

import argparse
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

import maskdecay as md

log = logging.getLogger(__name__)

__all__ = ["add_parser", "run_bench", "BenchConfig", "markdown_table"]

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


def _forward_fn(model: Any, x: torch.Tensor, fast: Any | None) -> Callable[[], torch.Tensor]:
    """One float networks-only pass, as the official code timed it (``EVC.forward`` without the bit estimates):
    enc, hyper_enc, rounding, hyper_dec, fusion, the two-pass dual prior with one spatial-prior call, dec.
    ``fast``: a FastEngine whose float transform is used for every network (None: the model's own modules)."""
    from .models import checkerboard

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
        _forward_fn(model, x, None)()
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
    from .kernels import nnpack_ok, onednn_ok

    cpu32 = (torch.device("cpu"), torch.float32)
    return {"onednn": onednn_ok(*cpu32), "nnpack": nnpack_ok(*cpu32)}


def sgemm_probe(size: int = 1024, reps: int = 5) -> float:
    """The machine's current float32 GEMM rate in GFLOP/s (best of ``reps`` square ``size`` matmuls with torch's
    thread setting): recorded before and after a CPU bench, because a shared host's speed drifts (docs/performance.md
    saw the same forward take 0.58 s and 0.83 s within an hour), so absolute times can be read against it."""
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
    import evc
    from .fast import DTYPES, FastEngine

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
    model = evc.build_model(cfg.arch).to(dev).eval()
    w, h = cfg.width, cfg.height
    if cfg.image:
        x, _, _ = evc.load_image(cfg.image)
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    else:
        x = synthetic_image(w, h)
    x = x.to(dev)
    rate = evc.select_rate(model, rate_index=cfg.rate_index)
    opts = {"dtype": DTYPES[cfg.dtype], "impl": cfg.impl, "channels_last": cfg.channels_last,
            "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs, "kernels": cfg.kernels}
    t_build = time.perf_counter()
    fast = FastEngine(model, **opts)
    build_s = time.perf_counter() - t_build
    engines: dict[str, Any] = {"fast": fast}
    cfg = replace(cfg, impl=fast.impl)  # what "auto" resolved to
    if cfg.reference:
        engines = {"reference": evc.codec.ReferenceEngine(model), "fast": fast}
    xp = evc.codec.pad_image(x)
    forwards = {name: _forward_fn(model, xp, fast if name == "fast" else None)
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
                t, r = clock(lambda: evc.compress(model, x, rate, engine=eng))
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
                t, d = clock(lambda: evc.decompress(model, data, exact_synthesis=exact, engine=eng))
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
        "machine": {"cpu": md.cpu_name(), "cpu_features": md.cpu_features(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in load_after],
                    "sgemm_gflops_before": probe_before and round(probe_before, 1),
                    "sgemm_gflops_after": probe_after and round(probe_after, 1),
                    "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"), "anon_huge_pages_mb": _anon_huge_mb(),
                    "peak_rss_mb": md.peak_rss_mb(),
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
    """Top-level keys for the fast path (what ``evc encode`` / ``evc decode`` run by default), the layout of the
    codec issue's bench JSON: seconds, FPS, entropy-coding ns/symbol."""
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
    import evc
    from .metrics import psnr

    out: dict[str, Any] = {"stream_bytes": {k: len(v) for k, v in streams.items()},
                           "bpp": {k: len(v) * 8 / (x.shape[-1] * x.shape[-2]) for k, v in streams.items()}}
    fast = engines["fast"]
    s_fast = streams["fast"]
    exact_fast = evc.decompress(model, s_fast, engine=fast).x_hat
    float_fast = evc.decompress(model, s_fast, exact_synthesis=False, engine=fast).x_hat
    out["psnr_float_vs_exact_synthesis_db"] = float(psnr(float_fast, exact_fast))
    out["max_abs_float_vs_exact_synthesis"] = float((float_fast - exact_fast).abs().max())
    if "reference" in streams:
        ref = engines["reference"]
        out["streams_identical"] = streams["reference"] == s_fast
        if not out["streams_identical"]:  # where the decoded latents differ (a flipped rounding also moves the
            # spatial-prior means of its neighbours, so this counts flips and their neighbourhoods)
            y_ref = evc.decompress(model, streams["reference"], engine=fast).y_hat
            y_fast = evc.decompress(model, s_fast, engine=fast).y_hat
            out["latents_differing"] = int((y_ref != y_fast).sum())  # type: ignore[operator]
            out["latents_total"] = int(y_ref.numel())  # type: ignore[union-attr]
        exact_ref = evc.decompress(model, s_fast, engine=ref).x_hat
        out["cross_decode_identical"] = bool(torch.equal(exact_ref, exact_fast))
        out["reference_stream_decodes_identically"] = bool(torch.equal(
            evc.decompress(model, streams["reference"], engine=ref).x_hat,
            evc.decompress(model, streams["reference"], engine=fast).x_hat))
    return out


_MD_STAGES = (
    ("forward", "networks only, one forward"),
    ("codec_networks", "codec networks, enc + dec (float synthesis)"),
    ("encode", "encode wall (incl. entropy coding)"),
    ("decode", "decode wall, float synthesis"),
    ("decode-exact", "decode wall, exact synthesis (CLI default)"),
)


def _md_cell(res: dict[str, Any], key: str) -> str:
    r = res["results"]
    if key not in r.get("fast", {}):
        return "–"
    fast = r["fast"][key]["median_s"] * 1000
    if key not in r.get("reference", {}):
        return f"{fast:,.0f}"
    return f"{r['reference'][key]['median_s'] * 1000:,.0f} → {fast:,.0f} ({res['speedup'][key]:.2f}×)"


def _cpu_label(machine: dict[str, Any]) -> str:
    """The record's CPU name with its vector extensions (JSON files from before they were recorded: the name)."""
    return md.cpu_label(machine["cpu"], machine.get("cpu_features") or [])


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One markdown row per :func:`run_bench` result (the tables of docs/performance.md): ``ref → fast`` medians in
    ms with the speed-up, the fast path's FPS, the machine's state, and whether the two streams were identical."""
    head = (["variant", "size", "device", "threads", "runs", "load before → after", "sgemm GFLOP/s before / after"]
            + [label + ": ms" for _, label in _MD_STAGES]
            + ["fast FPS: networks only / encode / decode (exact)", "streams identical", "peak RSS, GB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        c, m, fast = res["config"], res["machine"], res["results"]["fast"]
        fps = " / ".join(f"{1 / fast[k]['median_s']:.2f}" if k in fast else "–"
                         for k in ("forward", "encode", "decode-exact"))
        probe = (f"{m['sgemm_gflops_before']:.0f} / {m['sgemm_gflops_after']:.0f}"
                 if m.get("sgemm_gflops_before") else "–")
        if "streams_identical" not in res:
            same = "–"
        elif res["streams_identical"]:
            same = "yes"
        else:
            same = f"no ({res['latents_differing']:,} of {res['latents_total']:,} latents)"
        device = m.get("gpu") or (_cpu_label(m) if m.get("cpu") else c["device"])
        path = c["dtype"] + (" + CUDA graphs" if c["cuda_graphs"] else "") + (" + compile" if c["compile"] else "")
        row = ([c["arch"], c["padded"], f"{device} ({path})", str(c["threads"]), str(c["runs"]),
                f"{m['loadavg_before'][0]:.1f} → {m['loadavg_after'][0]:.1f}", probe]
               + [_md_cell(res, k) for k, _ in _MD_STAGES]
               + [fps, same, f"{m['peak_rss_mb'] / 1024:.1f}" if m.get("peak_rss_mb") else "–"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _table_main(argv: list[str] | None = None) -> int:
    """``python -m evc.bench table A.json [B.json ...]``: the markdown table of saved ``evc bench --json`` files."""
    ap = argparse.ArgumentParser(prog="python -m evc.bench table",
                                 description="markdown table of evc bench --json files, one row each")
    ap.add_argument("files", nargs="+", help="JSON files written by evc bench --json")
    args = ap.parse_args(argv)
    results = []
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"{path}: {e}")
        if not isinstance(res, dict) or not {"config", "machine", "results"} <= res.keys():
            ap.error(f"{path}: not an evc bench JSON (no config/machine/results)")
        results.append(res)
    print(markdown_table(results))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
_ROWS = (
    ("forward", "networks only, one forward (official timing)"),
    ("codec_networks", "codec networks: encode + decode"),
    ("codec_networks_exact", "codec networks, exact synthesis"),
    ("encode", "encode (wall, incl. entropy coding)"),
    ("enc_analysis", "  analysis (enc + hyper_enc)"),
    ("enc_entropy_params", "  entropy parameters (exact)"),
    ("enc_entropy_coding", "  entropy coding"),
    ("enc_entropy_coding_cpu", "  entropy coding, CPU time (overlapped)"),
    ("decode", "decode, float synthesis (wall)"),
    ("dec_entropy_params", "  entropy parameters (exact)"),
    ("dec_entropy_coding", "  entropy decoding"),
    ("dec_synthesis", "  synthesis (float)"),
    ("decode-exact", "decode, exact synthesis (wall)"),
    ("dec_exact_synthesis", "  synthesis (exact float64)"),
)


def format_table(res: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` result."""
    c = res["config"]
    m = res["machine"]
    names = list(res["results"])
    lines = [f"{c['arch']} {c['size']} (padded {c['padded']}) {c['device']} threads={c['threads']} fast path: "
             f"impl={c['impl']} dtype={c['dtype']}" + (" channels_last" if c["channels_last"] else "")
             + (" compile" if c["compile"] else "") + (" cuda_graphs" if c["cuda_graphs"] else "")
             + ("" if c.get("kernels", True) else " no-kernels")
             + f"; random weights; median (p90) of {c['runs']} runs after {c['warmup']} warm-up",
             f"load average before {m['loadavg_before'][0]:.2f}, after {m['loadavg_after'][0]:.2f} "
             f"({_cpu_label(m)}, {m['cpu_count']} CPUs)"
             + (f"; sgemm 1024^2 before {m['sgemm_gflops_before']:.0f}, after {m['sgemm_gflops_after']:.0f} GFLOP/s"
                if m.get("sgemm_gflops_before") else "")
             + (f"; {m['anon_huge_pages_mb']:.0f} MB on huge pages" if m.get("anon_huge_pages_mb") is not None
                else "")
             + (f"; peak RSS {m['peak_rss_mb'] / 1024:.1f} GB" if m.get("peak_rss_mb") else "")
             + ("; --low-memory" if c.get("low_memory") else "")
             + (f"; CPU kernels: oneDNN {'yes' if m['cpu_kernels']['onednn'] else 'no'}, NNPACK "
                f"{'yes' if m['cpu_kernels']['nnpack'] else 'no'}" if m.get("cpu_kernels") and c.get("kernels", True)
                else "")]
    head = f"{'stage':<46}" + "".join(f"{n + ' ms':>22}" for n in names)
    if "speedup" in res:
        head += f"{'speedup':>9}"
    lines += [head, "-" * len(head)]
    for key, label in _ROWS:
        if not all(key in res["results"][n] for n in names):
            continue
        row = f"{label:<46}"
        for n in names:
            r = res["results"][n][key]
            row += f"{r['median_s'] * 1000:>13.1f} ({r['p90_s'] * 1000:>6.0f})"
        if "speedup" in res and key in res["speedup"]:
            row += f"{res['speedup'][key]:>8.2f}x"
        lines.append(row)
    if res.get("forward_gmac"):
        rates = ", ".join(f"{n} {2 * res['forward_gmac'] / res['results'][n]['forward']['median_s']:.0f}"
                          for n in names)
        lines.append(f"forward: {res['forward_gmac']:.1f} GMAC; achieved GFLOP/s: {rates}")
    for n in names:
        r = res["results"][n]
        fps = []
        for key, label in (("forward", "networks-only"), ("encode", "encode"), ("decode", "decode"),
                           ("decode-exact", "decode exact")):
            if key in r:
                fps.append(f"{label} {1 / r[key]['median_s']:.2f}")
        if fps:
            lines.append(f"FPS {n}: " + ", ".join(fps))
    if "streams_identical" in res:
        same = "yes" if res["streams_identical"] else (
            f"no, decoded latents differ at {res['latents_differing']} of {res['latents_total']} positions "
            f"(float-noise rounding flips in the analysis and their neighbours; --impl eager gives byte-identical "
            f"streams)")
        lines.append(f"streams identical: {same}"
                     f"; cross-decoding identical: {'yes' if res['cross_decode_identical'] else 'NO'}"
                     f"; {res['stream_bytes']['fast']} bytes, {res['bpp']['fast']:.4f} bpp")
    if "psnr_float_vs_exact_synthesis_db" in res:
        lines.append(f"float vs exact synthesis: PSNR {res['psnr_float_vs_exact_synthesis_db']:.1f} dB, "
                     f"max abs {res['max_abs_float_vs_exact_synthesis']:.2e}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evc bench`` on the ``evc`` sub-command parser."""
    from .cli import _parse_size

    p = sub.add_parser("bench", help="speed of the reference and fast paths (random weights, no checkpoint)",
                       description="Speed of the EVC codec: the reference path and the fast path measured in the "
                                   "same run, interleaved (see docs/performance.md).")
    p.add_argument("--arch", default="EVC_SS", help="architecture, built with random weights (default EVC_SS)")
    p.add_argument("--size", type=_parse_size, default=(768, 512),
                   help="WxH (default 768x512); padded to a multiple of 64 (1920x1080 runs as 1920x1088)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fast path: precision of the float transforms (exact networks stay float64)")
    p.add_argument("--impl", default="auto", choices=["auto", "fused", "eager"],
                   help="fast path: fused channels-last executor, the model's own modules, or auto (default: eager "
                        "for fp32 on CUDA, fused otherwise)")
    p.add_argument("--channels-last", action="store_true",
                   help="fast path with --impl eager: channels-last memory format (fused is channels-last anyway)")
    p.add_argument("--compile", action="store_true", help="fast path: torch.compile the float transforms")
    p.add_argument("--cuda-graphs", action="store_true", help="fast path on CUDA: replay captured graphs")
    p.add_argument("--no-kernels", action="store_true",
                   help="fast path without the CPU kernels of evc.kernels (oneDNN epilogue fusion, Winograd, NNPACK)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    p.add_argument("--no-reference", action="store_true", help="time the fast path only")
    p.add_argument("--low-memory", action="store_true",
                   help="as in evc encode/decode: glibc returns freed memory (lower peak, slower on the CPU)")
    p.add_argument("--image", default=None, help="image to code, resized to --size (default: synthetic)")
    p.add_argument("--rate-index", type=int, default=3, help="q_scale anchor 0..3 (default 3, the highest rate)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.set_defaults(handler=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    """``evc bench``: run, print the table, write JSON."""
    from tqdm import tqdm

    from .bitstream import atomic_write_bytes
    from .cli import CLIError, check_cuda_graphs
    from .fast import tune_allocator

    if args.runs < 1 or args.warmup < 0:
        raise CLIError("--runs must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise CLIError("--threads must be >= 1")
    if args.channels_last and args.impl == "fused":
        log.info("--channels-last: the fused executor is channels-last already")
    check_cuda_graphs(args.cuda_graphs, args.device)
    if args.json_out:
        d = os.path.dirname(os.path.abspath(args.json_out))
        if not os.path.isdir(d):
            raise CLIError(f"{args.json_out}: output folder {d} does not exist")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    w, h = args.size
    tuned = tune_allocator(keep_freed=not args.low_memory)
    cfg = BenchConfig(arch=args.arch, width=w, height=h, device=args.device, dtype=args.dtype, impl=args.impl,
                      channels_last=args.channels_last, compile=args.compile, cuda_graphs=args.cuda_graphs,
                      kernels=not args.no_kernels, threads=args.threads, runs=args.runs, warmup=args.warmup,
                      rate_index=args.rate_index,
                      image=args.image, stages=stages, reference=not args.no_reference,
                      extra={"allocator_tuned": tuned, "low_memory": args.low_memory})
    n_engines = 1 if args.no_reference else 2
    with tqdm(total=(args.runs + args.warmup) * n_engines, desc="bench", unit="pass", leave=False) as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg, refresh=False)
            bar.update(1)
        res = run_bench(cfg, progress)
    print(format_table(res))
    if args.json_out:
        atomic_write_bytes(args.json_out, (json.dumps(res, indent=1) + "\n").encode())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# reduced-precision study (python -m evc.bench precision ...)
# ---------------------------------------------------------------------------------------------------------------
def precision_study(model: Any, images: list[str], dtypes: list[str], rate_index: int = 3,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Code every image with the fast path in float32 and in each reduced ``dtype``.

    Per image and dtype: the stream of the reduced-precision encoder must decode with the float32 reference engine
    to exactly the latents the reduced-precision engine's own decoder gives (decodable across paths);
    PSNR against the original of (a) the float synthesis in ``dtype`` of the float32 stream and (b) the whole
    reduced-precision path (its encoder, its float synthesis), each against the float32 fast path."""
    import evc
    from .codec import ReferenceEngine, _curr_q64
    from .fast import DTYPES, FastEngine
    from .metrics import psnr

    dev = next(model.parameters()).device
    rate = evc.select_rate(model, rate_index=rate_index)
    ref = ReferenceEngine(model)
    e32 = FastEngine(model)
    engines = {d: FastEngine(model, dtype=DTYPES[d]) for d in dtypes}
    curr_q = _curr_q64(model, rate.q_scale)
    rows = []
    for path in images:
        if progress:
            progress(os.path.basename(path))
        x, _, _ = evc.load_image(path)
        x = x.to(dev)
        h, w = x.shape[-2:]
        s32 = evc.compress(model, x, rate, engine=e32).data
        d32 = evc.decompress(model, s32, exact_synthesis=False, engine=e32)
        row: dict[str, Any] = {"image": os.path.basename(path), "bpp_fp32": len(s32) * 8 / (h * w),
                               "psnr_fp32": psnr(d32.x_hat, x)}
        y_dq = d32.y_hat * curr_q  # type: ignore[operator]
        for d, eng in engines.items():
            sd = evc.compress(model, x, rate, engine=eng).data
            own = evc.decompress(model, sd, exact_synthesis=False, engine=eng)
            by_ref = evc.decompress(model, sd, exact_synthesis=False, engine=ref)
            row[f"decodable_{d}"] = bool(torch.equal(by_ref.y_hat, own.y_hat))  # same latents from both decoders
            row[f"bpp_{d}"] = len(sd) * 8 / (h * w)
            syn = eng.synthesis(y_dq, exact=False).clamp_(0, 1)[..., :h, :w]
            row[f"psnr_{d}_synthesis"] = psnr(syn, x)
            row[f"psnr_{d}_path"] = psnr(own.x_hat, x)
        rows.append(row)
    summary: dict[str, Any] = {"images": len(rows), "rate_index": rate_index,
                               "psnr_fp32": statistics.mean(r["psnr_fp32"] for r in rows)}
    for d in dtypes:
        summary[d] = {
            "all_decodable": all(r[f"decodable_{d}"] for r in rows),
            "delta_psnr_synthesis_db": statistics.mean(r[f"psnr_{d}_synthesis"] - r["psnr_fp32"] for r in rows),
            "max_abs_delta_psnr_synthesis_db": max(abs(r[f"psnr_{d}_synthesis"] - r["psnr_fp32"]) for r in rows),
            "delta_psnr_path_db": statistics.mean(r[f"psnr_{d}_path"] - r["psnr_fp32"] for r in rows),
            "max_abs_delta_psnr_path_db": max(abs(r[f"psnr_{d}_path"] - r["psnr_fp32"]) for r in rows),
            "delta_bpp": statistics.mean(r[f"bpp_{d}"] - r["bpp_fp32"] for r in rows),
        }
    return {"summary": summary, "per_image": rows}


def _precision_main(argv: list[str] | None = None) -> int:
    """``python -m evc.bench precision --dataset DIR --model CKPT [--dtypes bf16,fp16] [--json OUT]``."""
    import glob

    from tqdm import tqdm

    from .bitstream import atomic_write_bytes
    from .cli import resolve_model
    from .fast import DTYPES, tune_allocator

    ap = argparse.ArgumentParser(prog="python -m evc.bench precision",
                                 description="fp16/bf16 fast paths against float32: PSNR and cross decoding")
    ap.add_argument("--dataset", required=True, help="folder of PNG images (e.g. Kodak)")
    ap.add_argument("--model", required=True, help="checkpoint, or random:ARCH[:SEED]")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--rate-index", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES or d == "fp32"]
    if bad:
        ap.error(f"--dtypes: unknown or float32 entries {bad}; use fp16, bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    images = sorted(glob.glob(os.path.join(args.dataset, "*.png")))[:args.limit]
    if not images:
        ap.error(f"no PNG images in {args.dataset}")
    model = resolve_model(args.model, None, args.device)
    with tqdm(total=len(images), desc="precision", leave=False) as bar:
        res = precision_study(model, images, dtypes, args.rate_index, lambda m: bar.update(1))
    res["config"] = {"model": args.model, "dataset": args.dataset, "device": args.device,
                     "threads": torch.get_num_threads(), "dtypes": dtypes, "torch": torch.__version__}
    s = res["summary"]
    print(f"{args.model} on {len(images)} images of {args.dataset}, rate index {args.rate_index}, "
          f"fp32 fast path PSNR {s['psnr_fp32']:.3f} dB")
    print(f"{'dtype':<6} {'decodable':>9} {'dPSNR synth':>12} {'max |d|':>8} {'dPSNR path':>11} {'max |d|':>8} "
          f"{'d bpp':>8}")
    for d in dtypes:
        r = s[d]
        print(f"{d:<6} {'yes' if r['all_decodable'] else 'NO':>9} {r['delta_psnr_synthesis_db']:>+12.4f} "
              f"{r['max_abs_delta_psnr_synthesis_db']:>8.4f} {r['delta_psnr_path_db']:>+11.4f} "
              f"{r['max_abs_delta_psnr_path_db']:>8.4f} {r['delta_bpp']:>+8.4f}")
    if args.json_out:
        atomic_write_bytes(args.json_out, (json.dumps(res, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    import sys

    _COMMANDS = {"precision": _precision_main, "table": _table_main}
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        sys.exit("usage: python -m evc.bench precision --dataset DIR --model CKPT [--dtypes bf16,fp16] [--json OUT]\n"
                 "       python -m evc.bench table A.json [B.json ...]   (markdown table of evc bench --json files)\n"
                 "timing: evc bench")
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
