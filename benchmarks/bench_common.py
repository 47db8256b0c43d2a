"""Shared by the EVC benchmark scripts of this folder (imported from the script's own folder): interleaved timing,
the layer shapes of a model's forward pass, and the JSON record.

Interleaving (f1, f2, f1, f2, ...) makes machine noise hit every variant equally, so ratios stay meaningful on a
shared host.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch

from maskdecay_examples.evc.cli.benchmark import forward_fn
from maskdecay_examples.evc.models.zoo import build_model
from maskdecay_examples.hostinfo import cpu_label

__all__ = ["interleaved", "best", "layer_shapes", "finish"]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function over ``rounds`` interleaved rounds (f1, f2, f1, f2, ...), after one
    warm-up call each."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def best(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time of each function over interleaved rounds, in ms."""
    return {k: min(v) * 1e3 for k, v in interleaved(fns, rounds).items()}


def layer_shapes(arch: str, h: int, w: int) -> tuple[set[tuple[int, int, int]], set[tuple[int, int, int, int]]]:
    """(pixels, in, out) of every 1x1 conv and (h, w, in, out) of every Winograd-eligible 3x3 conv of a forward."""
    model = build_model(arch).eval()
    pw: set[tuple[int, int, int]] = set()
    w3: set[tuple[int, int, int, int]] = set()

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inp[0]
        if mod.kernel_size == (1, 1) and mod.groups == 1 and mod.stride == (1, 1):
            pw.add((x.shape[0] * x.shape[2] * x.shape[3], mod.in_channels, mod.out_channels))
        elif mod.kernel_size == (3, 3) and mod.groups == 1 and mod.stride == (1, 1):
            w3.add((x.shape[2], x.shape[3], mod.in_channels, mod.out_channels))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        forward_fn(model, torch.rand(1, 3, h, w), None)()
    for hk in hooks:
        hk.remove()
    return pw, w3


def finish(res: dict, path: str | None) -> None:
    """Record the host and the load average after the run and write ``res`` to ``path`` as JSON (when given)."""
    res["load_after"] = os.getloadavg()[0]
    res.setdefault("machine", cpu_label())
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
