"""Profiling: MACs, parameters, measured latency and per-layer widths of a model."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .macs import count_layer_macs, run_model


@dataclass
class Report:
    """What :func:`profile` measured. MACs count conv/linear layers only (see :mod:`maskdecay.macs`)."""

    macs: float
    params: int
    latency_ms: float
    latency_p90_ms: float
    device: str
    threads: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)

    def table(self, layers: bool = True) -> str:
        """A plain-text table: totals, then one row per conv/linear layer (name, type, in -> out, MACs)."""
        lines = [f"MACs {self.macs / 1e6:.2f} M | params {self.params / 1e6:.3f} M | latency {self.latency_ms:.2f} ms "
                 f"(median, p90 {self.latency_p90_ms:.2f} ms, {self.device}, {self.threads} threads)"]
        if layers and self.layers:
            w = max(len(r["name"]) for r in self.layers)
            lines.append(f"{'layer':<{w}}  {'type':<16} {'in':>6} {'out':>6} {'MACs (M)':>10}")
            for r in self.layers:
                lines.append(f"{r['name']:<{w}}  {r['type']:<16} {r['in']:>6} {r['out']:>6} {r['macs'] / 1e6:>10.3f}")
        return "\n".join(lines)


def measure_latency(fn: Callable[[], Any], warmup: int = 3, runs: int = 10, device: str = "cpu") -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls of ``fn`` after ``warmup`` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile(model: nn.Module, example_inputs: Any, warmup: int = 3, runs: int = 10,
            forward_fn: Callable | None = None) -> Report:
    """MACs and parameters of ``model`` and its latency on ``example_inputs`` (eval mode, ``inference_mode``).

    The model's training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        macs = count_layer_macs(model, example_inputs, forward_fn)
        modules = dict(model.named_modules())
        rows = []
        for name, m in macs.items():
            mod = modules[name]
            cin = getattr(mod, "in_channels", getattr(mod, "in_features", 0))
            cout = getattr(mod, "out_channels", getattr(mod, "out_features", 0))
            rows.append({"name": name, "type": type(mod).__name__, "in": cin, "out": cout, "macs": m})
        device = str(next((p.device for p in model.parameters()), torch.device("cpu")))
        with torch.inference_mode():
            times = measure_latency(lambda: run_model(model, example_inputs, forward_fn), warmup, runs, device)
    finally:
        model.train(was_training)
    times.sort()
    return Report(macs=float(sum(macs.values())), params=sum(p.numel() for p in model.parameters()),
                  latency_ms=statistics.median(times), latency_p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
                  device=device, threads=torch.get_num_threads(), layers=rows)
