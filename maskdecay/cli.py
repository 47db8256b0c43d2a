"""``maskdecay`` console script: ``profile`` a model factory, ``plot`` saved decay histories."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import torch

from . import plots
from .profiling import profile


def _factory(spec: str):
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FACTORY (e.g. torchvision.models:resnet18), got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} (is it on PYTHONPATH?): {e}") from e
    if not hasattr(module, fn_name):
        raise ValueError(f"{mod_name!r} has no attribute {fn_name!r}")
    return getattr(module, fn_name)


def _shape(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must be comma-separated integers like 1,3,224,224, got {text!r}")
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"--input dimensions must be >= 1, got {text!r}")
    return dims


def _cmd_profile(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = _factory(args.factory)()
    x = torch.randn(*args.input)
    report = profile(model, x, warmup=args.warmup, runs=args.runs)
    print(report.table(layers=not args.summary))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")


def _cmd_plot(args: argparse.Namespace) -> None:
    runs = {}
    for d in args.runs:
        h = plots.load_history(d)
        name = Path(d).name if Path(d).is_dir() else Path(d).stem
        runs[name if name not in runs else f"{name}-{len(runs)}"] = h
        if args.trajectories:
            out = Path(d) / "masks.png" if Path(d).is_dir() else Path(d).with_suffix(".png")
            print(plots.mask_trajectories(h, out))
    print(plots.compare(runs, args.output))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskdecay", description="Mask-decay pruning toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile", help="MACs, params, CPU latency and layer widths of MODULE:FACTORY()")
    p.add_argument("factory", help="MODULE:FACTORY, a callable returning an nn.Module; MODULE must be importable "
                                   "(installed, or on PYTHONPATH: PYTHONPATH=. for a module in the current folder)")
    p.add_argument("--input", type=_shape, required=True, help="input shape, e.g. 1,3,224,224")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--summary", action="store_true", help="totals only, no per-layer rows")
    p.add_argument("--json", help="also write the report as JSON")
    p.set_defaults(func=_cmd_profile)
    q = sub.add_parser("plot", help="compare the decay histories of run folders (each with history.json)")
    q.add_argument("runs", nargs="+", help="run folders or history.json files")
    q.add_argument("-o", "--output", default="compare.png")
    q.add_argument("--trajectories", action="store_true", help="also draw each run's mask trajectories")
    q.set_defaults(func=_cmd_plot)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except ValueError as e:
        print(f"maskdecay: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
