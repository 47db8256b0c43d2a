"""Training-step time of a masked vs a plain model (ResNet-56 on 32x32, batch 64, CPU), measured in one run.

The model is the ResNet example's CIFAR ResNet (:mod:`maskdecay_examples.resnet.models`), randomly initialised.

    .venv/bin/python benchmarks/overhead.py [--steps 20] [--json out.json]

Plain and masked steps are interleaved (plain, masked, plain, ...) so machine noise hits both equally; the table
reports medians and the ratio masked/plain.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import maskdecay as md
from maskdecay_examples.hostinfo import cpu_label
from maskdecay_examples.resnet.models import build


def step_time(model, opt, x, y, decay=None) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if decay is not None:
        loss = loss + decay.penalty()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if decay is not None:
        decay.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = build(f"resnet{args.depth}").train().to(memory_format=torch.channels_last)
    masked = copy.deepcopy(plain)
    x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    masks = md.ChannelMasks(masked, x[:1])
    decay = md.MaskDecay(masks, md.plan(masks, macs=0.5), steps=10 ** 6, regularizer="sparsity")
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_m = torch.optim.SGD(masked.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        step_time(plain, opt_p, x, y)
        step_time(masked, opt_m, x, y, decay)
    tp, tm = [], []
    for _ in range(args.steps):
        tp.append(step_time(plain, opt_p, x, y))
        tm.append(step_time(masked, opt_m, x, y, decay))
    mp, mm = statistics.median(tp), statistics.median(tm)
    res = {"model": f"resnet{args.depth}", "batch": args.batch, "threads": torch.get_num_threads(),
           "plain_ms": mp * 1e3, "masked_ms": mm * 1e3, "ratio": mm / mp, "steps": args.steps,
           "mask_points": sum(len(g.mask_points) for g in masks.groups), "torch": torch.__version__,
           "machine": cpu_label()}
    print(f"{'model':<10} {'batch':>5} {'plain ms':>9} {'masked ms':>10} {'ratio':>6}")
    print(f"{res['model']:<10} {args.batch:>5} {res['plain_ms']:>9.1f} {res['masked_ms']:>10.1f} {res['ratio']:>6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
