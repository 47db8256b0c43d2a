"""``evc`` command line: encode, decode, eval, bdrate, plot, bench, info.

Every failure is reported as one line ``evc: error: ...`` on stderr with a non-zero exit status (2 for usage
errors, 1 otherwise); output files are written atomically, so a failed run leaves no partial file.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
from typing import Any, Sequence

__all__ = ["main", "resolve_model"]

log = logging.getLogger("evc")


class CLIError(Exception):
    """A user-facing error (one line)."""


def _parse_size(s: str) -> tuple[int, int]:
    try:
        w, h = s.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 768x512, got {s!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return w, h


def _unit_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"--q must be in [0, 1], got {v}")
    return v


def _pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"--q-scale must be a positive number, got {s}")
    return v


def resolve_model(spec: str, arch: str | None, device: str) -> Any:
    """Load ``spec`` (a checkpoint path, or ``random:ARCH[:SEED]`` for random weights)."""
    import torch

    import evc

    if spec.startswith("random:"):
        parts = spec.split(":")
        name = parts[1] if len(parts) > 1 and parts[1] else (arch or "EVC_SS")
        seed = int(parts[2]) if len(parts) > 2 else 0
        torch.manual_seed(seed)
        m = evc.build_model(name)
        return m.to(device).eval()
    key = None
    try:
        st = os.stat(spec)
        key = (os.path.abspath(spec), st.st_mtime_ns, st.st_size, arch, device)
    except OSError:
        pass
    if key is not None and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    model = evc.load_model(spec, arch=arch, device=device)
    if key is not None:
        if len(_MODEL_CACHE) >= 2:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = model
    return model


#: in-process cache of loaded checkpoints (matters only when main() is called repeatedly, e.g. by the fuzzer)
_MODEL_CACHE: dict[tuple, Any] = {}


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="checkpoint path (official or ours), or random:ARCH[:SEED] for random weights")
    p.add_argument("--arch", default=None, help="architecture name (default: inferred from the checkpoint)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", action="store_true",
                   help="plain path (eager float32 modules, evc.exact twins) instead of the fast path (same entropy "
                        "parameters; see docs/performance.md)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fast path: precision of the float transforms (entropy parameters stay exact): fp16/bf16 on "
                        "GPUs, bf16 also on CPUs with AVX512_BF16 or AMX (elsewhere emulated and slower; a warning says "
                        "so)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="fast path on CUDA: capture every network once per image size and replay it (pays off "
                        "from a few images of one size on, e.g. in eval)")
    p.add_argument("--low-memory", action="store_true",
                   help="let the C heap return freed memory instead of keeping it for reuse: lower peak memory "
                        "(EVC_LL at 1920x1080: encode 3.5 instead of 4.7-5.1 GB, decode 4.2 instead of 5.2 GB), "
                        "slower on the CPU (that decode: 42-51 instead of 31-34 s; docs/performance.md 3.7)")


def _add_rate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--q", type=_unit_float, help="rate in [0,1]: 0 = lowest-rate anchor, 1 = highest (default 1)")
    g.add_argument("--q-scale", type=_pos_float, help="explicit q_scale (> 0)")
    g.add_argument("--rate-index", type=int, help="anchor index 0..3")
    p.add_argument("--enc-id", type=int, default=None,
                   help="scalable models: use encoders 0..ENC_ID only (default: all, RD choice)")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (``evc: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"evc: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``evc`` command."""
    ap = _Parser(prog="evc", description="EVC neural image codec (encode/decode/evaluate).")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("encode", help="compress an image to a .evc file")
    p.add_argument("input")
    p.add_argument("output")
    _add_model_args(p)
    _add_rate_args(p)
    _add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")

    p = sub.add_parser("decode", help="decompress a .evc file to an image (PNG)")
    p.add_argument("input")
    p.add_argument("output")
    _add_model_args(p)
    p.add_argument("--max-pixels", type=int, default=1 << 26,
                   help="refuse streams declaring more pixels than this (default 2^26)")
    p.add_argument("--fast-synthesis", action="store_true",
                   help="float32 synthesis (about 3-4x faster on CPU; the image may then differ in the last bit "
                        "between thread counts/machines; default is the exact, bit-reproducible synthesis)")
    _add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")

    p = sub.add_parser("eval", help="evaluate on a folder of images (real bitstreams)")
    p.add_argument("--dataset", required=True, help="folder of PNG images (e.g. Kodak)")
    _add_model_args(p)
    p.add_argument("--json", dest="json_out", required=True, help="output JSON (CompressAI-style)")
    p.add_argument("--rates", type=int, default=4,
                   help="number of rate points: = anchor count uses the anchors, otherwise log-spaced q_scales "
                        "from the first to the last anchor (default 4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    p.add_argument("--crop", type=_parse_size, default=None, help="centre-crop every image to WxH (quick runs)")
    p.add_argument("--name", default=None, help="name recorded in the JSON (default: model name)")
    p.add_argument("--verify", action="store_true",
                   help="also check decoded == encoder-side reconstruction (slower)")
    p.add_argument("--enc-id", type=int, default=None, help="scalable models: encoders 0..ENC_ID only")
    p.add_argument("--fast-synthesis", action="store_true",
                   help="decode with the float synthesis (faster; PSNR within ~1e-4 dB of the default exact one)")
    _add_engine_args(p)

    p = sub.add_parser("bdrate", help="BD-rate of B (test) against A (anchor); official:EVC_LL etc. allowed")
    p.add_argument("anchor")
    p.add_argument("test", nargs="+")
    p.add_argument("--method", default="akima", choices=["akima", "pchip", "cubic"],
                   help="bjontegaard interpolation (default akima)")
    p.add_argument("--metric", default="psnr", choices=["psnr", "ms-ssim"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plot", help="RD curves of result files to an image")
    p.add_argument("results", nargs="+", help="result JSON files or official:EVC_LL / official:EVC_MM / official:EVC_SS")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--metric", default="psnr", choices=["psnr", "ms-ssim"])
    p.add_argument("--title", default=None)

    p = sub.add_parser("info", help="print the header of a .evc file")
    p.add_argument("input")

    from evc import bench, decay, rrl, train  # these commands live in their own modules

    bench.add_parser(sub)
    train.add_parser(sub)
    decay.add_parser(sub)
    rrl.add_parser(sub)
    return ap


# ---------------------------------------------------------------------------------------------------------------
def _setup_torch(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        if args.threads < 1:
            raise CLIError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    dev = getattr(args, "device", "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"device {dev} requested but CUDA is not available")


def check_cuda_graphs(cuda_graphs: bool, device: Any) -> None:
    """``--cuda-graphs`` only with a CUDA device (shared by the codec commands and ``evc bench``)."""
    if cuda_graphs and not str(device).startswith("cuda"):
        raise CLIError("--cuda-graphs needs --device cuda")


def _engine(args: argparse.Namespace, model: Any) -> Any:
    """The inference engine asked for on the command line (fast unless --reference)."""
    if args.reference:
        if args.dtype != "fp32" or args.cuda_graphs:
            raise CLIError("--dtype and --cuda-graphs apply to the fast path, not to --reference")
        return None
    check_cuda_graphs(args.cuda_graphs, getattr(args, "device", "cpu"))
    from evc.codec import _state_key
    from evc.fast import DTYPES, FastEngine

    key = (id(model), args.dtype, args.cuda_graphs)
    eng = _ENGINE_CACHE.get(key)
    if eng is None or eng.model is not model or eng.key != _state_key(model):
        if len(_ENGINE_CACHE) >= 2:
            _ENGINE_CACHE.pop(next(iter(_ENGINE_CACHE)))
        eng = _ENGINE_CACHE[key] = FastEngine(model, dtype=DTYPES[args.dtype], cuda_graphs=args.cuda_graphs)
    return eng


#: in-process cache of fast engines (building one quantises all exact weights; matters for repeated main() calls)
_ENGINE_CACHE: dict[tuple, Any] = {}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CLIError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_out(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CLIError(f"{path}: output folder {d} does not exist")


def cmd_encode(args: argparse.Namespace) -> int:
    import evc
    from evc.bitstream import atomic_write_bytes

    _setup_torch(args)
    _check_out(args.output)
    x, flags, note = evc.load_image(args.input)
    if note:
        print(f"note: {note}", file=sys.stderr)
    model = resolve_model(args.model, args.arch, args.device)
    rate = evc.select_rate(model, q=args.q, q_scale=args.q_scale, rate_index=args.rate_index)
    res = evc.compress(model, x.to(args.device), rate, enc_id=args.enc_id, flags=flags,
                       engine=_engine(args, model))
    atomic_write_bytes(args.output, res.data)
    size = os.path.getsize(args.output)
    info = {
        "input": args.input, "output": args.output, "model": model.name, "width": res.width, "height": res.height,
        "q_scale": rate.q_scale, "rate_index": None if rate.rate_index == 255 else rate.rate_index,
        "bytes": size, "bpp": size * 8 / (res.width * res.height),
        "estimated_bpp": res.est_bits / (res.width * res.height),
        "encoding_time": res.times["total"], "enc_choice": res.enc_choice,
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.output}: {res.width}x{res.height} {model.name} q_scale={rate.q_scale:.6g} "
              f"{size} bytes {info['bpp']:.4f} bpp (estimated {info['estimated_bpp']:.4f}) "
              f"{res.times['total'] * 1000:.0f} ms")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import evc

    _setup_torch(args)
    _check_out(args.output)
    data = _read_bytes(args.input)
    evc.bitstream.unpack(data)  # fail fast on a corrupt stream, before loading the model
    model = resolve_model(args.model, args.arch, args.device)
    out = evc.decompress(model, data, max_pixels=args.max_pixels, exact_synthesis=not args.fast_synthesis,
                         engine=_engine(args, model))
    evc.save_image(args.output, out.x_hat)
    h = out.header
    info = {"input": args.input, "output": args.output, "width": h.width, "height": h.height, "q_scale": h.q_scale,
            "bpp": len(data) * 8 / (h.width * h.height), "decoding_time": out.times["total"]}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.output}: {h.width}x{h.height} from {len(data)} bytes ({info['bpp']:.4f} bpp) "
              f"{out.times['total'] * 1000:.0f} ms")
    return 0


def _centre_crop(x: Any, size: tuple[int, int] | None) -> Any:
    if size is None:
        return x
    w, h = size
    H, W = x.shape[-2:]
    w, h = min(w, W), min(h, H)
    t, l = (H - h) // 2, (W - w) // 2
    return x[..., t:t + h, l:l + w]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import evc
    from evc.bitstream import atomic_write_bytes
    from evc.codec import _interp_log
    from evc.metrics import ms_ssim, psnr

    _setup_torch(args)
    if not os.path.isdir(args.dataset):
        raise CLIError(f"{args.dataset}: not a folder")
    _check_out(args.json_out)
    exts = (".png", ".bmp", ".tif", ".tiff", ".ppm", ".jpg", ".jpeg", ".webp")
    files = sorted(f for f in os.listdir(args.dataset) if f.lower().endswith(exts))
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise CLIError(f"{args.dataset}: no images found")
    if args.rates < 1:
        raise CLIError("--rates must be >= 1")
    if args.verify and args.fast_synthesis:
        raise CLIError("--verify compares with the exact synthesis; drop --fast-synthesis")
    model = resolve_model(args.model, args.arch, args.device)
    eng = _engine(args, model)
    anchors = model.anchors()
    if args.rates == len(anchors):
        rates = [evc.select_rate(model, rate_index=i) for i in range(len(anchors))]
    elif args.rates == 1:
        rates = [evc.select_rate(model, q_scale=anchors[-1])]
    else:
        n = args.rates
        qs = [_interp_log([anchors[0], anchors[-1]], i / (n - 1)) for i in range(n)]
        rates = [evc.select_rate(model, q_scale=q) for q in qs]
    rows = []
    notes = set()
    bar = tqdm(total=len(files) * len(rates), desc="eval", unit="run", file=sys.stderr)
    for f in files:
        path = os.path.join(args.dataset, f)
        x, flags, note = evc.load_image(path)
        if note:
            notes.add(note)
        x = _centre_crop(x, args.crop).to(args.device)
        for ri, rate in enumerate(rates):
            res = evc.compress(model, x, rate, enc_id=args.enc_id, flags=flags, return_recon=args.verify, engine=eng)
            out = evc.decompress(model, res.data, exact_synthesis=not args.fast_synthesis, engine=eng)
            if args.verify and not torch.equal(res.x_hat, out.x_hat):
                raise CLIError(f"{f}: decoded image differs from the encoder-side reconstruction")
            pix = res.width * res.height
            x8 = torch.from_numpy(evc.codec.to_uint8(out.x_hat)).permute(2, 0, 1)[None].float() / 255
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
                        f"8-bit PNG); means over {len(files)} images; model {args.model}"),
        "results": results,
        "meta": {"dataset": os.path.abspath(args.dataset), "images": len(files), "crop": args.crop,
                 "device": args.device, "threads": __import__("torch").get_num_threads(),
                 "engine": "reference" if args.reference else f"fast {args.dtype}",
                 "synthesis": "float" if args.fast_synthesis else "exact",
                 "platform": platform.platform(), "python": platform.python_version()},
        "per_image": rows,
    }
    atomic_write_bytes(args.json_out, (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode())
    print(f"{'rate':>4} {'q_scale':>8} {'bpp':>8} {'est.bpp':>8} {'PSNR':>8} {'MS-SSIM':>8} {'enc s':>7} {'dec s':>7}")
    for i, r in enumerate(rates):
        print(f"{i:>4} {r.q_scale:>8.4f} {results['bpp'][i]:>8.4f} {results['bpp-estimated'][i]:>8.4f} "
              f"{results['psnr-rgb'][i]:>8.3f} {results['ms-ssim-rgb'][i]:>8.5f} {results['encoding_time'][i]:>7.3f} "
              f"{results['decoding_time'][i]:>7.3f}")
    print(f"wrote {args.json_out}")
    return 0


def cmd_bdrate(args: argparse.Namespace) -> int:
    from evc.metrics import bd_rate, load_results

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
    from evc.metrics import load_results, plot_rd

    _check_out(args.output)
    res = [load_results(r) for r in args.results]
    plot_rd(res, args.output, metric=args.metric, title=args.title)
    print(f"wrote {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from evc.bitstream import unpack
    from evc.models import ARCH_CODES

    data = _read_bytes(args.input)
    h, payload = unpack(data)
    inv = {v: k for k, v in ARCH_CODES.items()}
    print(json.dumps({"version": h.version, "arch": inv.get(h.arch_code, f"code {h.arch_code}"),
                      "weights_hash": h.weights_hash.hex(), "tables_crc": f"{h.tables_crc:08x}",
                      "width": h.width, "height": h.height, "q_scale": h.q_scale,
                      "rate_index": None if h.rate_index == 255 else h.rate_index, "flags": h.flags,
                      "payload_bytes": len(payload), "bytes": len(data),
                      "bpp": len(data) * 8 / (h.width * h.height)}))
    return 0


_PARSER: argparse.ArgumentParser | None = None

COMMANDS = {"encode": cmd_encode, "decode": cmd_decode, "eval": cmd_eval, "bdrate": cmd_bdrate,
            "plot": cmd_plot, "bench": lambda a: a.handler(a), "info": cmd_info,
            "train": lambda a: a.handler(a), "decay": lambda a: a.handler(a),
            "rrl": lambda a: a.handler(a)}  # handlers set by their modules


#: commands that run the codec's networks: main() tunes the process's memory allocation for them (``bench`` tunes
#: in its own handler, before its first tensor, and records the outcome)
_TUNED_COMMANDS = ("encode", "decode", "eval")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evc`` console script; returns the exit status."""
    global _PARSER
    if _PARSER is None:
        _PARSER = build_parser()
    ap = _PARSER
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="evc: %(levelname)s: %(message)s")
    if args.cmd in _TUNED_COMMANDS:  # before the first tensor exists (huge pages are chosen at the first allocation)
        from evc.fast import tune_allocator

        tune_allocator(keep_freed=not args.low_memory)
    try:
        return COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        print("evc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback (unless --debug)
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        known = isinstance(e, (CLIError, ValueError, OSError))
        prefix = "error" if known else f"internal error ({type(e).__name__})"
        print(f"evc: {prefix}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
