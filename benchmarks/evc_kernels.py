"""The CPU kernels of the EVC fast path (``maskdecay_examples.evc.engines.kernels``) against the plain executor,
measured in one run.

    .venv/bin/python benchmarks/evc_kernels.py [--arch EVC_SS EVC_LL] [--size 768x512] [--threads 2]
                                               [--rounds 5] [--json out.json]

Three tables:

1. every distinct 1x1 and dense 3x3 stride-1 layer shape of the chosen models' networks-only forward: the plain
   route (MKL ``addmm`` + in-place activation; oneDNN direct 3x3 convolution) against the route the kernels'
   rules pick (oneDNN 1x1 with fused epilogue; for wide 3x3 layers our Winograd F(4x4,3x3) or NNPACK, by size),
   each timed as the best of ``--rounds`` interleaved calls; 3x3 rows also time both Winograd routes;
2. the networks-only forward (``evc bench``'s "forward" stage) with the kernels off, on without the NNPACK route
   (our F(4x4) for every wide 3x3 layer) and on, interleaved, median of ``--rounds``;
3. the exact float64 synthesis (``FastExactNet(model.dec)``, the CLI's default decoder) with its pixel/row bands
   and without them (one band), interleaved, median of ``--rounds``; outputs checked bit-identical.

Random weights (seed 0) and the bench's synthetic image; ratios are the meaningful numbers on a shared machine.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from typing import Callable

import torch

from bench_common import best, finish, interleaved, layer_shapes
from maskdecay_examples.evc.cli.benchmark import forward_fn, synthetic_image
from maskdecay_examples.evc.engines import kernels
from maskdecay_examples.evc.engines.allocator import tune_allocator
from maskdecay_examples.evc.engines.fast import FastEngine
from maskdecay_examples.evc.engines.fast_exact import FastExactNet
from maskdecay_examples.evc.engines.kernels import (ConvKxK, NNPACK3x3, Pointwise, Wide3x3, Winograd3x3, nnpack_ok,
                                                    onednn_ok, use_winograd)
from maskdecay_examples.evc.models.zoo import build_model


def bench_layers(shapes_pw: set, shapes_w3: set, rounds: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, cin, cout in sorted(shapes_pw):
        x = torch.randn(n, cin, generator=g)
        wt, b = torch.randn(cout, cin, generator=g) / math.sqrt(cin), torch.randn(cout, generator=g)
        plain, fused = Pointwise(wt, b, 0.01, onednn=False), Pointwise(wt, b, 0.01, onednn=True)
        if not fused.uses_onednn(n):
            continue
        t = best({"plain": lambda: plain(x), "kernel": lambda: fused(x)}, rounds)
        rows.append({"layer": f"1x1 {cin}->{cout}", "shape": f"{n} px", "plain_ms": t["plain"],
                     "kernel_ms": t["kernel"], "route": "oneDNN 1x1 + fused bias/act"})
    cpu32 = (torch.device("cpu"), torch.float32)
    onednn, nnpack = onednn_ok(*cpu32), nnpack_ok(*cpu32)
    for h, w, cin, cout in sorted(shapes_w3):
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        x = torch.randn(1, h, w, cin, generator=g)
        wt, b = conv.weight.detach(), conv.bias.detach()
        kerns = {"plain": ConvKxK(wt, b, (1, 1), (1, 1), 1, 0.01, onednn=onednn), "winograd": Winograd3x3(wt, b, 0.01)}
        if nnpack:
            kerns["nnpack"] = NNPACK3x3(wt, b, 0.01)
        t = best({k: (lambda kern=kern: kern(x)) for k, kern in kerns.items()}, rounds)
        chosen = use_winograd(conv, *cpu32)
        wide = Wide3x3(wt, b, 0.01, onednn=onednn, nnpack=nnpack).backend(h * w)
        key = {Winograd3x3: "winograd", NNPACK3x3: "nnpack", ConvKxK: "plain"}[type(wide)] if chosen else "plain"
        rows.append({"layer": f"3x3 {cin}->{cout}", "shape": f"{h}x{w}", "plain_ms": t["plain"],
                     "kernel_ms": t[key], "winograd_ms": t["winograd"], "nnpack_ms": t.get("nnpack"),
                     "route": {"winograd": "Winograd F(4x4,3x3)", "nnpack": "NNPACK", "plain": "direct"}[key]
                     + ("" if chosen else " (Winograd ineligible: < 128 channels)")
                     + f"; ours {t['winograd']:.1f} ms" + (f", NNPACK {t['nnpack']:.1f} ms" if "nnpack" in t else "")})
    return rows


def _without_nnpack(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the NNPACK route of the wide 3x3 layers switched off (our F(4x4) at every size, the rule before
    NNPACK was added); the threshold is read per call, so it is patched around the call."""
    def run() -> object:
        keep = kernels.NNPACK_MIN_PX
        kernels.NNPACK_MIN_PX = 1 << 62
        try:
            return fn()
        finally:
            kernels.NNPACK_MIN_PX = keep
    return run


def bench_forward(arch: str, h: int, w: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = synthetic_image(w, h)
    on = FastEngine(model, kernels=True)
    times = interleaved({"off": forward_fn(model, x, FastEngine(model, kernels=False)),
                          "no_nnpack": _without_nnpack(forward_fn(model, x, on)),
                          "on": forward_fn(model, x, on)}, rounds)
    return {"arch": arch, "off_s": statistics.median(times["off"]), "on_s": statistics.median(times["on"]),
            "no_nnpack_s": statistics.median(times["no_nnpack"]), "runs": times}


def bench_exact_synthesis(arch: str, h: int, w: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch).eval()
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(1, model.N, h // 16, w // 16, generator=g, dtype=torch.float64) * 2).round()
    nets = {"one band": FastExactNet(model.dec, band_bytes=1 << 62), "banded": FastExactNet(model.dec)}
    if not torch.equal(nets["one band"](y), nets["banded"](y)):
        raise AssertionError("banded exact synthesis differs from the unbanded one")
    times = interleaved({k: (lambda n=n: n(y)) for k, n in nets.items()}, rounds)
    return {"arch": arch, "one_band_s": statistics.median(times["one band"]),
            "banded_s": statistics.median(times["banded"]), "runs": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["EVC_SS", "EVC_LL"])
    ap.add_argument("--size", default="768x512", help="WxH (multiple of 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-layers", action="store_true", help="skip the per-layer table")
    ap.add_argument("--json")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    tune_allocator()
    res: dict = {"size": args.size, "threads": args.threads, "rounds": args.rounds,
                 "load_before": os.getloadavg()[0], "layers": [], "forward": []}
    if not args.skip_layers:
        pw: set = set()
        w3: set = set()
        for arch in args.arch:
            a, b = layer_shapes(arch, h, w)
            pw |= a
            w3 |= b
        res["layers"] = bench_layers(pw, w3, args.rounds)
        print(f"{'layer':<16} {'shape':<10} {'plain ms':>9} {'kernel ms':>10} {'speed-up':>8}  route")
        for r in res["layers"]:
            print(f"{r['layer']:<16} {r['shape']:<10} {r['plain_ms']:9.1f} {r['kernel_ms']:10.1f} "
                  f"{r['plain_ms'] / r['kernel_ms']:7.2f}x  {r['route']}")
        print()
    print(f"{'model':<8} {'forward, kernels off':>21} {'on, no NNPACK':>14} {'kernels on':>11} {'speed-up':>8}   "
          f"({args.size}, {args.threads} threads, median of {args.rounds})")
    for arch in args.arch:
        r = bench_forward(arch, h, w, args.rounds)
        res["forward"].append(r)
        print(f"{arch:<8} {r['off_s'] * 1e3:19.0f} ms {r['no_nnpack_s'] * 1e3:11.0f} ms {r['on_s'] * 1e3:8.0f} ms "
              f"{r['off_s'] / r['on_s']:7.2f}x")
    print()
    print(f"{'model':<8} {'exact synthesis, one band':>26} {'banded':>9} {'speed-up':>8}   (bit-identical)")
    res["exact_synthesis"] = []
    for arch in args.arch:
        r = bench_exact_synthesis(arch, h, w, args.rounds)
        res["exact_synthesis"].append(r)
        print(f"{arch:<8} {r['one_band_s'] * 1e3:23.0f} ms {r['banded_s'] * 1e3:6.0f} ms "
              f"{r['one_band_s'] / r['banded_s']:7.2f}x")
    finish(res, args.json)


if __name__ == "__main__":
    main()
