"""Plots of mask trajectories and regularizer comparisons (matplotlib, file-only Agg canvas, written to files).

matplotlib is imported by the plotting functions, not by this module: ``import maskdecay`` stays free of it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping



def load_history(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A decay history: the dict itself, a ``history.json`` file, or a run folder holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "history.json"
    if not path.is_file():
        raise ValueError(f"no decay history at {path} (expected a history.json written from decay.history)")
    with open(path) as f:
        return json.load(f)


def _figure(cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure with ``cols`` panels in a row, drawn with the Agg backend (files only, no display needed)."""
    from matplotlib.figure import Figure  # here, not at module level: matplotlib takes about 0.5 s to import

    fig = Figure(figsize=size)
    return fig, fig.subplots(1, cols)


def _save(fig: Any, path: str | os.PathLike) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def mask_trajectories(history: Mapping[str, Any] | str | os.PathLike, path: str | os.PathLike,
                      title: str | None = None) -> str:
    """Two panels: sampled individual masks (removed: red, kept: blue) with the schedule's ceiling, and the
    summary curves (removed mean/max, effective removed strength, kept mean). Returns the file path."""
    h = load_history(history)
    steps = h["step"]
    fig, (a, b) = _figure(2, (11, 4))
    for label, ys in h["traces"].items():
        removed = label.startswith("removed")
        a.plot(steps, ys, color="tab:red" if removed else "tab:blue", alpha=0.5, lw=0.9)
    a.plot(steps, h["ceiling"], "k--", lw=1.2, label="schedule s(t)")
    a.plot([], [], color="tab:red", label="removed units")
    a.plot([], [], color="tab:blue", label="kept units")
    a.set_xlabel("step")
    a.set_ylabel("mask value")
    a.legend(loc="best", fontsize=8)
    b.plot(steps, h["removed_mean"], label="removed: mean |m|")
    b.plot(steps, h["removed_max"], label="removed: max |m|")
    b.plot(steps, h["removed_effective"], label="removed: |m| x weight-norm ratio")
    b.plot(steps, h["kept_mean"], label="kept: mean m")
    if h.get("cut_jump"):
        b.axvline(steps[-1], color="k", ls=":", lw=1)
        b.annotate(f"cut {h['cut_jump']:.2g}", (steps[-1], h["cut_jump"]), fontsize=8, ha="right")
    b.set_xlabel("step")
    b.legend(loc="best", fontsize=8)
    reg = h.get("regularizer", {})
    fig.suptitle(title or f"mask decay: {reg.get('name', '?')} ({h.get('schedule', '?')} schedule, {h['steps']} steps)")
    return _save(fig, path)


def compare(runs: Mapping[str, Any], path: str | os.PathLike, title: str = "regularizers compared") -> str:
    """One curve per run (name -> history, history.json or run folder): largest removed mask, effective removed
    strength and mean kept mask against the fraction of the decay phase. Returns the file path."""
    if not runs:
        raise ValueError("compare() needs at least one run")
    fig, axes = _figure(3, (14, 4))
    keys = [("removed_max", "largest removed |m|"), ("removed_effective", "removed |m| x weight-norm ratio"),
            ("kept_mean", "mean kept m")]
    for name, src in runs.items():
        h = load_history(src)
        x = [s / h["steps"] for s in h["step"]]
        for ax, (k, _) in zip(axes, keys):
            ax.plot(x, h[k], label=name)
    for ax, (_, label) in zip(axes, keys):
        ax.set_xlabel("fraction of decay phase")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
