"""``evc eval``, ``evc bdrate`` and ``evc plot``: real bitstreams over a folder of images, BD-rates and RD curves."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from typing import Any

import torch
from tqdm import tqdm

from ..coding.codec import check_enc_id, compress, decompress
from ..coding.rate import interp_log, select_rate
from ..fileio import atomic_write_bytes
from ..training.metrics import bd_rate, load_results, ms_ssim, plot_rd, psnr
from .common import (CLIError, add_engine_args, add_model_args, check_out, engine_from_args, parse_size, pos_int,
                     resolve_model, setup_torch)
from .imageio import load_image, to_uint8

__all__ = ["add_parsers", "cmd_eval", "cmd_bdrate", "cmd_plot"]


def add_parsers(sub: Any) -> None:
    """Register ``evc eval``, ``evc bdrate`` and ``evc plot``."""
    p = sub.add_parser("eval", help="evaluate on a folder of images (real bitstreams)")
    p.add_argument("--dataset", required=True, help="folder of PNG images (e.g. Kodak)")
    add_model_args(p)
    p.add_argument("--json", dest="json_out", required=True, help="output JSON (CompressAI-style)")
    p.add_argument("--rates", type=int, default=4,
                   help="number of rate points: = anchor count uses the anchors, otherwise log-spaced q_scales "
                        "from the first to the last anchor (default 4)")
    p.add_argument("--limit", type=pos_int, default=None, help="only the first N images (sorted by name), N >= 1")
    p.add_argument("--crop", type=parse_size, default=None, help="centre-crop every image to WxH (quick runs)")
    p.add_argument("--name", default=None, help="name recorded in the JSON (default: model name)")
    p.add_argument("--verify", action="store_true",
                   help="also check decoded == encoder-side reconstruction (slower)")
    p.add_argument("--enc-id", type=int, default=None, help="scalable models: encoders 0..ENC_ID only")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exact-synthesis", action="store_true",
                   help="decode with the exact float64 synthesis (bit-exact conformance, slower; PSNR within ~1e-4 dB "
                        "of the default float synthesis; implied by --verify)")
    g.add_argument("--fast-synthesis", action="store_true",
                   help="the float32 synthesis (the default; accepted for older scripts)")
    add_engine_args(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("bdrate", help="BD-rate of B (test) against A (anchor); official:EVC_LL etc. allowed")
    p.add_argument("anchor")
    p.add_argument("test", nargs="+")
    p.add_argument("--method", default="akima", choices=["akima", "pchip", "cubic"],
                   help="bjontegaard interpolation (default akima)")
    p.add_argument("--metric", default="psnr", choices=["psnr", "ms-ssim"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_bdrate)

    p = sub.add_parser("plot", help="RD curves of result files to an image")
    p.add_argument("results", nargs="+", help="result JSON files or official:EVC_LL / official:EVC_MM / official:EVC_SS")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--metric", default="psnr", choices=["psnr", "ms-ssim"])
    p.add_argument("--title", default=None)
    p.set_defaults(handler=cmd_plot)


def _centre_crop(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None:
        return x
    w, h = size
    H, W = x.shape[-2:]
    w, h = min(w, W), min(h, H)
    t, l = (H - h) // 2, (W - w) // 2
    return x[..., t:t + h, l:l + w]


def cmd_eval(args: argparse.Namespace) -> int:
    """``evc eval``: every image at every rate point, encoded to a real stream and decoded; CompressAI-style JSON."""
    setup_torch(args)
    if not os.path.isdir(args.dataset):
        raise CLIError(f"{args.dataset}: not a folder")
    check_out(args.json_out)
    exts = (".png", ".bmp", ".tif", ".tiff", ".ppm", ".jpg", ".jpeg", ".webp")
    files = sorted(f for f in os.listdir(args.dataset) if f.lower().endswith(exts))
    if args.limit is not None:
        files = files[: args.limit]
    if not files:
        raise CLIError(f"{args.dataset}: no images found")
    if args.rates < 1:
        raise CLIError("--rates must be >= 1")
    if args.verify and args.fast_synthesis:
        raise CLIError("--verify compares with the exact synthesis; drop --fast-synthesis")
    model = resolve_model(args.model, args.arch, args.device)
    check_enc_id(model, args.enc_id)
    eng = engine_from_args(args, model)
    exact = bool(args.exact_synthesis or args.verify)
    anchors = model.anchors()
    if args.rates == len(anchors):
        rates = [select_rate(model, rate_index=i) for i in range(len(anchors))]
    elif args.rates == 1:
        rates = [select_rate(model, q_scale=anchors[-1])]
    else:
        n = args.rates
        qs = [interp_log([anchors[0], anchors[-1]], i / (n - 1)) for i in range(n)]
        rates = [select_rate(model, q_scale=q) for q in qs]
    rows = []
    notes = set()
    bar = tqdm(total=len(files) * len(rates), desc="eval", unit="run", file=sys.stderr)
    skipped: list[dict[str, str]] = []
    for f in files:
        path = os.path.join(args.dataset, f)
        try:
            x, flags, note = load_image(path)
        except ValueError as e:  # an unreadable or unsupported image: reported on its own line, skipped
            bar.write(f"evc: warning: skipped {e}", file=sys.stderr)
            skipped.append({"image": f, "error": str(e)})
            bar.update(len(rates))
            continue
        if note:
            notes.add(note)
        x = _centre_crop(x, args.crop).to(args.device)
        for ri, rate in enumerate(rates):
            res = compress(model, x, rate, enc_id=args.enc_id, flags=flags, return_recon=args.verify, engine=eng)
            out = decompress(model, res.data, exact_synthesis=exact, engine=eng)
            if args.verify and not torch.equal(res.x_hat, out.x_hat):
                raise CLIError(f"{f}: decoded image differs from the encoder-side reconstruction")
            pix = res.width * res.height
            x8 = torch.from_numpy(to_uint8(out.x_hat)).permute(2, 0, 1)[None].float() / 255
            rows.append({
                "image": f, "rate_point": ri, "rate_index": None if rate.rate_index == 255 else rate.rate_index,
                "q_scale": rate.q_scale, "width": res.width, "height": res.height,
                "bytes": len(res.data), "bpp": len(res.data) * 8 / pix,
                "bpp_estimated": res.est_bits / pix, "bpp_ideal": res.ideal_bits / pix,
                "psnr": psnr(out.x_hat, x), "psnr_8bit": psnr(x8.to(x.device), x), "ms_ssim": ms_ssim(out.x_hat, x),
                "encoding_time": res.times["total"], "decoding_time": out.times["total"],
                "enc_entropy_time": res.times["entropy_coding"], "dec_entropy_time": out.times["entropy_coding"],
                "num_symbols": res.num_symbols, "enc_choice": res.enc_choice,
            })
            bar.set_postfix_str(f"{f} bpp={rows[-1]['bpp']:.3f} psnr={rows[-1]['psnr']:.2f}", refresh=False)
            bar.update(1)
    bar.close()
    if not rows:
        raise CLIError(f"{args.dataset}: none of the {len(files)} images could be read")
    for n in sorted(notes):
        print(f"note: {n}", file=sys.stderr)

    def mean(key: str, ri: int) -> float:
        vals = [r[key] for r in rows if r["rate_point"] == ri and r[key] is not None]
        vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    keys = {"psnr-rgb": "psnr", "ms-ssim-rgb": "ms_ssim", "bpp": "bpp", "encoding_time": "encoding_time",
            "decoding_time": "decoding_time", "psnr-rgb-8bit": "psnr_8bit", "bpp-estimated": "bpp_estimated",
            "bpp-ideal": "bpp_ideal"}
    results = {k: [mean(v, i) for i in range(len(rates))] for k, v in keys.items()}
    results["q_scale"] = [r.q_scale for r in rates]
    name = args.name or model.name
    doc = {
        "name": name,
        "description": (f"evc eval: real bitstreams (bpp = file bytes*8/pixels, header included); PSNR/MS-SSIM in "
                        f"RGB on the float reconstruction clamped to [0,1] (official EVC protocol; psnr-rgb-8bit on the "
                        f"8-bit PNG); means over {len(files) - len(skipped)} images; model {args.model}"),
        "results": results,
        "meta": {"dataset": os.path.abspath(args.dataset), "images": len(files) - len(skipped),
                 "skipped": skipped, "crop": args.crop,
                 "device": args.device, "threads": torch.get_num_threads(),
                 "engine": "reference" if args.reference else f"fast {args.dtype}",
                 "synthesis": "exact" if exact else "float",
                 "platform": platform.platform(), "python": platform.python_version()},
        "per_image": rows,
    }
    atomic_write_bytes(args.json_out, (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode())
    print(f"{'rate':>4} {'q_scale':>8} {'bpp':>8} {'est.bpp':>8} {'PSNR':>8} {'MS-SSIM':>8} {'enc s':>7} {'dec s':>7}")
    for i, r in enumerate(rates):
        print(f"{i:>4} {r.q_scale:>8.4f} {results['bpp'][i]:>8.4f} {results['bpp-estimated'][i]:>8.4f} "
              f"{results['psnr-rgb'][i]:>8.3f} {results['ms-ssim-rgb'][i]:>8.5f} {results['encoding_time'][i]:>7.3f} "
              f"{results['decoding_time'][i]:>7.3f}")
    print(f"wrote {args.json_out}" + (f" ({len(skipped)} unreadable images skipped)" if skipped else ""))
    return 0


def cmd_bdrate(args: argparse.Namespace) -> int:
    """``evc bdrate ANCHOR TEST...``."""
    a = load_results(args.anchor)
    out = []
    for t in args.test:
        b = load_results(t)
        r, q = bd_rate(a, b, method=args.method, metric=args.metric)
        out.append({"anchor": a["name"], "test": b["name"], "bd_rate_percent": r, "bd_psnr_db": q,
                    "method": args.method, "metric": args.metric})
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0]))
    else:
        for o in out:
            print(f"BD-rate of {o['test']} vs {o['anchor']} ({args.metric}, bjontegaard {args.method}): "
                  f"{o['bd_rate_percent']:+.2f} %  (BD-{'PSNR' if args.metric == 'psnr' else 'MS-SSIM dB'} "
                  f"{o['bd_psnr_db']:+.3f} dB)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``evc plot RESULTS... -o OUT``."""
    check_out(args.output)
    res = [load_results(r) for r in args.results]
    plot_rd(res, args.output, metric=args.metric, title=args.title)
    print(f"wrote {args.output}")
    return 0

