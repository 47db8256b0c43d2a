"""Would int8 make the EVC float transforms faster on this CPU? PyTorch's quantized CPU kernels (fbgemm / x86
engine) against the fp32 fast path, measured in one run. A probe, not a codec path:
EVC has no int8 mode.

    .venv/bin/python benchmarks/evc_int8.py [--arch EVC_SS] [--size 768x512] [--threads 2] [--rounds 5]
                                            [--model CKPT --image PNG] [--json out.json]

Two tables:

1. every distinct 1x1 layer shape of the arch's networks-only forward: the fp32 route of the fast path
   (``kernels.Pointwise``: oneDNN 1x1 with fused epilogue where its rule picks it, else MKL ``addmm``), int8
   with dynamic activation quantisation (float in and out: ``quantized::linear_dynamic``) and static int8 (quint8
   in and out, scales given: ``quantized::linear``, the kernel alone); best of ``--rounds`` interleaved calls;
2. the analysis ``enc`` and synthesis ``dec`` as eager FX graph-mode static int8 (``torch.ao.quantization``, the
   x86 default qconfig, calibrated on the very input it is timed on, channels-last) against the fp32 fused
   executor (``FastTransform``), median of ``--rounds`` interleaved calls, with the relative L2 error of the
   output, and the PSNR of ``dec(round(enc(x) / q) * q)`` (highest-rate anchor, no entropy coding) to the input
   with both routes in fp32 and in int8, and of the int8 result to the fp32 one (the noise int8 adds). Random
   weights say little about quality: use ``--model`` (a trained EVC checkpoint) with ``--image``.

Random weights (seed 0) and the bench's synthetic image unless ``--model/--image``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import warnings
from typing import Any

import torch

from bench_common import best, finish, interleaved, layer_shapes
from maskdecay_examples.evc.cli.benchmark import synthetic_image
from maskdecay_examples.evc.engines.allocator import tune_allocator
from maskdecay_examples.evc.engines.fused import FastTransform
from maskdecay_examples.evc.engines.kernels import Pointwise
from maskdecay_examples.evc.models.zoo import build_model, load_model


def bench_gemms(shapes: set[tuple[int, int, int]], rounds: int) -> list[dict[str, Any]]:
    """fp32 route vs dynamic and static int8 for each (pixels, in, out) 1x1 shape."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, cin, cout in sorted(shapes):
        x = torch.randn(n, cin, generator=g)
        wt, b = torch.randn(cout, cin, generator=g) / math.sqrt(cin), torch.randn(cout, generator=g)
        fp32 = Pointwise(wt, b, 0.01, onednn=True)
        qw = torch.quantize_per_channel(wt, wt.abs().amax(1) / 127, torch.zeros(cout, dtype=torch.long), 0,
                                        torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, b)
        qx = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)
        t = best({"fp32": lambda: fp32(x),
                   "dynamic": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
                   "static": lambda: torch.ops.quantized.linear(qx, packed, 0.05, 128)}, rounds)
        flop = 2 * n * cin * cout
        rows.append({"layer": f"1x1 {cin}->{cout}", "pixels": n, **{f"{k}_ms": v for k, v in t.items()},
                     **{f"{k}_gflops": flop / v / 1e6 for k, v in t.items()}})
    return rows


def _int8(module: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """FX static int8 copy of ``module``, calibrated on ``x``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(module, get_default_qconfig_mapping("x86"), example_inputs=(x,))
    with torch.no_grad():
        prepared(x)
    return convert_fx(prepared)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(max(float(((a.clamp(0, 1) - b) ** 2).mean()), 1e-12))


@torch.inference_mode()
def bench_transforms(model: Any, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """fp32 fused executor vs FX static int8 for enc and dec; relative error; PSNR of the enc -> dec chain. The
    synthesis is calibrated and timed on the quantised latents of the fp32 analysis."""
    curr_q = model.curr_q(model.q_scale[-1]).detach()

    def quantised(y: torch.Tensor) -> torch.Tensor:
        return (torch.round(y / curr_q) * curr_q).contiguous(memory_format=torch.channels_last)

    res: dict[str, Any] = {}
    inp = x.contiguous(memory_format=torch.channels_last)
    for name, module in (("enc", model.enc), ("dec", model.dec)):
        fp32, q8 = FastTransform(module), _int8(module, inp)
        times = interleaved({"fp32": lambda: fp32(inp), "int8": lambda: q8(inp)}, rounds)
        ref, out = fp32(inp), q8(inp)
        res[name] = {"fp32_s": statistics.median(times["fp32"]), "int8_s": statistics.median(times["int8"]),
                     "rel_err": float((out - ref).norm() / ref.norm()), "runs": times}
        if name == "enc":
            y8 = out
            inp = quantised(ref)
    x32 = ref.clamp(0, 1)  # dec of the quantised fp32 latents, computed above
    x8 = q8(quantised(y8))
    res["psnr_fp32"], res["psnr_int8"], res["psnr_int8_vs_fp32"] = _psnr(x32, x), _psnr(x8, x), _psnr(x8, x32)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="EVC_SS")
    ap.add_argument("--size", default="768x512", help="WxH (multiple of 64) of the synthetic image")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", help="a trained EVC checkpoint (then --image is required)")
    ap.add_argument("--image", help="an RGB image whose sides are multiples of 64 (e.g. a Kodak PNG)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if bool(args.model) != bool(args.image):
        ap.error("--model and --image go together")
    # the quantized tensor API and its observers warn of their deprecation
    warnings.filterwarnings("ignore", message=".*(quantiz|reduce_range).*")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    tune_allocator()
    torch.manual_seed(0)
    if args.model:
        import numpy as np
        from PIL import Image

        try:
            model = load_model(args.model).eval()
            x = torch.from_numpy(np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"cannot load --model/--image: {e}")
        x = x.permute(2, 0, 1).unsqueeze(0).contiguous()
        if x.shape[-1] % 64 or x.shape[-2] % 64:
            ap.error(f"image sides must be multiples of 64, got {tuple(x.shape[-2:])}")
        label = f"{os.path.basename(args.model)} on {os.path.basename(args.image)}"
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        model, x, label = build_model(args.arch).eval(), synthetic_image(w, h), f"{args.arch}, random weights"
    h, w = x.shape[-2:]
    res: dict[str, Any] = {"model": label, "size": f"{w}x{h}", "threads": args.threads, "rounds": args.rounds,
                           "load_before": os.getloadavg()[0]}
    shapes, _ = layer_shapes(args.arch, h, w) if not args.model else (set(), None)
    res["gemms"] = bench_gemms(shapes, args.rounds)
    if res["gemms"]:
        print(f"{'layer':<16} {'pixels':>7} {'fp32 ms':>8} {'dyn int8':>9} {'static int8':>12}   GFLOP/s fp32 / "
              f"dyn / static")
        for r in res["gemms"]:
            print(f"{r['layer']:<16} {r['pixels']:7d} {r['fp32_ms']:8.1f} {r['dynamic_ms']:9.1f} "
                  f"{r['static_ms']:12.1f}   {r['fp32_gflops']:.0f} / {r['dynamic_gflops']:.0f} / "
                  f"{r['static_gflops']:.0f}")
        print()
    t = bench_transforms(model, x, args.rounds)
    res["transforms"] = t
    print(f"{label}, {w}x{h}, {args.threads} threads, median of {args.rounds}")
    print(f"{'network':<8} {'fp32 fused':>11} {'FX int8':>9} {'speed-up':>9} {'rel. error':>11}")
    for name in ("enc", "dec"):
        r = t[name]
        print(f"{name:<8} {r['fp32_s'] * 1e3:8.0f} ms {r['int8_s'] * 1e3:6.0f} ms {r['fp32_s'] / r['int8_s']:8.2f}x "
              f"{r['rel_err']:11.4f}")
    print(f"PSNR of dec(round(enc(x)/q)*q) to x: fp32 {t['psnr_fp32']:.2f} dB, int8 {t['psnr_int8']:.2f} dB; "
          f"int8 to fp32: {t['psnr_int8_vs_fp32']:.2f} dB")
    finish(res, args.json)


if __name__ == "__main__":
    main()
