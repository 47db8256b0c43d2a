"""Reduced-precision study: the fast path in fp16/bf16 against float32 on a folder of images (PSNR of the float
synthesis and of the whole path, bpp, and whether every stream decodes with the float32 reference engine).

    python -m maskdecay_examples.evc.cli.precision --dataset DIR --model CKPT [--dtypes bf16,fp16] [--json OUT]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..coding.codec import compress, decompress
from ..coding.rate import curr_q64, select_rate
from ..engines.allocator import tune_allocator
from ..engines.fast import DTYPES, FastEngine
from ..engines.reference import ReferenceEngine
from ..fileio import atomic_write_bytes
from ..models.architectures import EVC
from ..training.metrics import psnr
from .common import resolve_model
from .imageio import load_image

__all__ = ["precision_study", "main"]


def precision_study(model: EVC, images: list[str], dtypes: list[str], rate_index: int = 3,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Code every image with the fast path in float32 and in each reduced ``dtype``.

    Per image and dtype: the stream of the reduced-precision encoder must decode with the float32 reference engine
    to exactly the latents the reduced-precision engine's own decoder gives (decodable across paths);
    PSNR against the original of (a) the float synthesis in ``dtype`` of the float32 stream and (b) the whole
    reduced-precision path (its encoder, its float synthesis), each against the float32 fast path."""
    dev = next(model.parameters()).device
    rate = select_rate(model, rate_index=rate_index)
    ref = ReferenceEngine(model)
    e32 = FastEngine(model)
    engines = {d: FastEngine(model, dtype=DTYPES[d]) for d in dtypes}
    curr_q = curr_q64(model, rate.q_scale)
    rows = []
    for path in images:
        if progress:
            progress(os.path.basename(path))
        x, _, _ = load_image(path)
        x = x.to(dev)
        h, w = x.shape[-2:]
        s32 = compress(model, x, rate, engine=e32).data
        d32 = decompress(model, s32, exact_synthesis=False, engine=e32)
        row: dict[str, Any] = {"image": os.path.basename(path), "bpp_fp32": len(s32) * 8 / (h * w),
                               "psnr_fp32": psnr(d32.x_hat, x)}
        y_dq = d32.y_hat * curr_q  # type: ignore[operator]
        for d, eng in engines.items():
            sd = compress(model, x, rate, engine=eng).data
            own = decompress(model, sd, exact_synthesis=False, engine=eng)
            by_ref = decompress(model, sd, exact_synthesis=False, engine=ref)
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


def main(argv: list[str] | None = None) -> int:
    """The study from the command line (see the module docstring); prints a table, optionally writes JSON."""
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.cli.precision",
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
    sys.exit(main())
