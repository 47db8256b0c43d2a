"""Brief training of a (small) EVC model, only to get realistic latent statistics for coder-overhead checks.

A thin front end to ``evc train`` (:mod:`.train`) with the settings of the coder checks: straight-through
rounding, constant learning rate, no validation, random crops from a folder of images. This is NOT the EVC
training recipe (which is not published). Usage::

    python -m maskdecay_examples.evc.training.brief --data ../shared/data/kodak --arch mini_EVC_SS --steps 300 \
        --out runs/evc_brief.pt
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from ..models.architectures import EVC
from ..models.zoo import save_model
from .config import config_from_dict
from .train import train as run_train

__all__ = ["train", "main"]


def train(data: str, arch: str = "mini_EVC_SS", steps: int = 300, batch: int = 8, size: int = 128,
          lr: float = 1e-3, seed: int = 0, progress: bool = True) -> EVC:
    """Train ``arch`` for ``steps`` steps on random ``size``x``size`` crops of the images in ``data``; returns the
    model in eval mode."""
    cfg = config_from_dict({
        "model": {"arch": arch},
        "data": {"train": data, "crop": size, "batch": batch},
        "optim": {"lr": lr, "schedule": "constant"},
        "train": {"steps": steps, "seed": seed, "quant": "ste", "ckpt_every": steps, "val_every": 0},
        "val": {"images": 0},
    }, "train_brief")
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = run_train(cfg, tmp, progress=progress)
    return model


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.training.brief",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--arch", default="mini_EVC_SS")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = train(args.data, args.arch, args.steps, args.batch, args.size, args.lr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_model(m, args.out)
    print(f"wrote {args.out}; q_scale anchors {[round(v, 4) for v in m.anchors()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
