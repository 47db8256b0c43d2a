"""``evc bench``: the command line of :mod:`.benchmark` and its plain-text report."""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from tqdm import tqdm

from ..engines.allocator import tune_allocator
from ..fileio import atomic_write_bytes
from .benchmark import STAGES, BenchConfig, run_bench
from .common import CLIError, check_cuda_graphs, parse_size
from .tables import record_cpu_label

log = logging.getLogger(__name__)

__all__ = ["add_parser", "cmd_bench", "format_table"]


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
             f"({record_cpu_label(m)}, {m['cpu_count']} CPUs)"
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
    p = sub.add_parser("bench", help="speed of the reference and fast paths (random weights, no checkpoint)",
                       description="Speed of the EVC codec: the reference path and the fast path measured in the "
                                   "same run, interleaved (see docs/performance.md).")
    p.add_argument("--arch", default="EVC_SS", help="architecture, built with random weights (default EVC_SS)")
    p.add_argument("--size", type=parse_size, default=(768, 512),
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
                   help="fast path without its CPU kernels (oneDNN epilogue fusion, Winograd, NNPACK)")
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
