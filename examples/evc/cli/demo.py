"""The EVC pipeline end to end at a tiny scale: ``make evc-demo`` or
``python -m maskdecay_examples.evc.cli.demo --out runs/evc_demo``.

teacher (``evc train``) -> mask decay to EVC_SS (``evc decay``) -> RRL scalable encoder (``evc rrl``) ->
Kodak encode/decode with real bitstreams (``evc eval``, centre crops) -> RD plot with the official curves and a
BD-rate table against the teacher. Settings: ``examples/evc/configs/demo.yaml`` (``--set`` overrides). The models
are far too small and briefly trained to say anything about EVC's quality; the demo shows that every stage runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from ..training.config import load_config
from ..training.decay import run_decay
from ..training.metrics import bd_or_nan, load_results
from ..training.rrl import run_rrl
from ..training.train import train
from .main import main as cli

CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.yaml")


def _evc(*argv: str) -> None:
    rc = cli(list(argv))
    if rc:
        raise SystemExit(f"evc {argv[0]} failed (exit {rc})")


def _table(jsons: list[str]) -> str:
    """RD points of every run and BD-rate / BD-PSNR against the teacher (``jsons[1]``)."""
    res = [load_results(j) for j in jsons]
    lines = ["", "Kodak crops, real bitstreams (4 anchors, lowest rate first); BD against the demo teacher (pchip):",
             f"{'model':<16} {'bpp':<30} {'PSNR dB':<26} {'BD-rate':>9} {'BD-PSNR':>9}"]
    for r in res:
        bpp = " ".join(f"{v:.3f}" for v in r["results"]["bpp"])
        psnr = " ".join(f"{v:.2f}" for v in r["results"]["psnr-rgb"])
        bdr = bdp = "-"
        if r is not res[1] and r is not res[0]:
            rate, dq = bd_or_nan(res[1], r)
            bdr = "n/a" if math.isnan(rate) else f"{rate:+.1f} %"  # n/a: the PSNR ranges do not overlap
            bdp = f"{dq:+.2f} dB"
        lines.append(f"{r['name']:<16} {bpp:<30} {psnr:<26} {bdr:>9} {bdp:>9}")
    lines.append("(BD-rate n/a = the PSNR ranges do not overlap enough; BD-PSNR is over the common rate range)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints where the results are."""
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.cli.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/evc_demo")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--data", default=None,
                    help="data folder holding kodak/ and train/imagenet_samples/ (make evc-demo DATA=...); sets "
                         "--kodak and the config's data.train and val.data")
    ap.add_argument("--kodak", default=None, help="Kodak folder (default: the config's val.data)")
    ap.add_argument("--eval-images", type=int, default=4, help="Kodak images to code (default 4)")
    ap.add_argument("--eval-crop", default="256x256", help="centre crop for coding (default 256x256)")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = args.out
    if args.data is not None:
        args.overrides = [f"data.train={json.dumps(os.path.join(args.data, 'train', 'imagenet_samples'))}",
                          f"val.data={json.dumps(os.path.join(args.data, 'kodak'))}", *args.overrides]
    cfg = load_config(args.config, args.overrides)
    args.kodak = args.kodak or cfg.val.data
    for path in (cfg.data.train, args.kodak):
        if not os.path.isdir(path):
            raise SystemExit(f"evc demo: {path}: data folder not found; pass the data folder with --data DIR "
                             "(make evc-demo DATA=DIR; README, Data)")
    stamps = {}
    teacher_dir = os.path.join(out, "teacher")
    train(cfg, teacher_dir, resume=True)
    stamps["teacher"] = time.time() - t0
    teacher = os.path.join(teacher_dir, "model.pt")
    cfg = load_config(args.config, [*args.overrides, f"decay.teacher={json.dumps(teacher)}"])
    ss = run_decay(cfg, os.path.join(out, "ss"), resume=True)
    stamps["decay"] = time.time() - t0 - sum(stamps.values())
    rrl = run_rrl(cfg, ss["path"], os.path.join(out, "rrl"), resume=True)
    stamps["rrl"] = time.time() - t0 - sum(stamps.values())
    runs = {"teacher_init": os.path.join(teacher_dir, "init.pt"), "teacher": teacher, "ss": ss["path"],
            "scalable": rrl["path"]}
    jsons = []
    for name, model in runs.items():
        j = os.path.join(out, f"{name}.json")
        _evc("eval", "--dataset", args.kodak, "--model", model, "--json", j, "--limit", str(args.eval_images),
             "--crop", args.eval_crop, "--name", name, "--threads", "1")
        jsons.append(j)
    j = os.path.join(out, "scalable_level0.json")
    _evc("eval", "--dataset", args.kodak, "--model", rrl["path"], "--json", j, "--limit", str(args.eval_images),
         "--crop", args.eval_crop, "--name", "scalable_level0", "--enc-id", "0", "--threads", "1")
    jsons.append(j)
    stamps["eval"] = time.time() - t0 - sum(stamps.values())
    _evc("plot", *jsons[1:], "official:EVC_LL", "official:EVC_SS", "-o", os.path.join(out, "rd.png"),
         "--title", "evc demo (tiny models, Kodak crops) vs official EVC")
    print(_table(jsons))
    print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stamps.items())
          + f", total {time.time() - t0:.0f}")
    print(f"results: {out}/ (rd.png, *.json, teacher/, ss/, rrl/ with logs and checkpoints)")
    print(f"code your own image with the EVC_SS student: evc encode IMAGE.png OUT.evc --model {ss['path']}")
    print(f"and decode it: evc decode OUT.evc OUT.png --model {ss['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
