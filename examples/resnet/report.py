"""Results of a pruning study: interleaved CPU latency, the text table, the accuracy-vs-MACs plot, ``results.json``."""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import maskdecay as md  # noqa: E402

from .data import DATA_NOTE  # noqa: E402


def latencies(models: dict[str, nn.Module], batch: int, rounds: int, runs: int, seed: int = 0) -> dict[str, float]:
    """Median CPU latency (ms) of one eval forward pass of ``batch`` 32x32 images per model.

    The models are timed in ``rounds`` rounds, in a shuffled order each round, ``runs`` passes each, so that load
    from other processes on a shared machine falls on every model alike. Returns the median over all passes.
    """
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    rng = random.Random(seed)
    for r in range(rounds):
        rng.shuffle(order)
        for k in order:
            rep = md.profile(models[k].eval(), x, warmup=2 if r == 0 else 1, runs=runs)
            times[k].append(rep.latency_ms)
    return {k: statistics.median(v) for k, v in times.items()}


def add_speed(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> None:
    """Add ``speedup`` (teacher latency / student latency), ``mac_reduction`` and their ratio to each row."""
    for r in rows:
        r["mac_reduction"] = teacher["macs"] / r["macs"]
        r["speedup"] = teacher["latency_ms"] / r["latency_ms"]
        r["speedup_over_mac_reduction"] = r["speedup"] / r["mac_reduction"]


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, Any]) -> str:
    """Fixed-width text table: the teacher, then one row per (budget, method)."""
    t = results["teacher"]
    head = (f"{'method':<13} {'budget':>6} {'MACs':>8} {'rel':>5} {'params':>7} {'acc@cut':>7} {'acc':>6} "
            f"{'reload':>6} {'lat b' + str(results['latency_batch']):>8} {'speedup':>7} {'MAC red':>7} {'ratio':>5} "
            f"{'time':>6}")
    lines = [f"{results['arch']} on {results.get('data', DATA_NOTE)}; test accuracy %; latency: CPU, "
             f"{results['threads']} threads, median ms", head, "-" * len(head),
             f"{'teacher':<13} {'-':>6} {t['macs'] / 1e6:>7.2f}M {1:>5.2f} {t['params'] / 1e3:>6.0f}k {'-':>7} "
             f"{t['accuracy']:>6.2f} {'-':>6} {t['latency_ms']:>8.2f} {1:>7.2f} {1:>7.2f} {1:>5.2f} {'-':>6}"]
    for r in sorted(results["runs"], key=lambda r: (-r["budget"], results["methods"].index(r["method"]))):
        lines.append(
            f"{r['method']:<13} {r['budget']:>6.2f} {r['macs'] / 1e6:>7.2f}M {r['macs'] / t['macs']:>5.2f} "
            f"{r['params'] / 1e3:>6.0f}k {_fmt(r.get('accuracy_after_export'), '7.2f')} {r['accuracy']:>6.2f} "
            f"{('exact' if r['reload_exact'] else 'DIFF'):>6} {r['latency_ms']:>8.2f} {r['speedup']:>7.2f} "
            f"{r['mac_reduction']:>7.2f} {r['speedup_over_mac_reduction']:>5.2f} {r['seconds']:>5.0f}s")
    lines.append("acc@cut: right after export (mask decay) or after pruning (TP), before fine-tuning; reload: the saved "
                 "student reloaded gives the same accuracy; ratio: real speed-up / MAC reduction")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The table as Markdown (for docs): one row per run, teacher first."""
    t = results["teacher"]
    lines = ["| method | budget | MACs | params | acc. at cut | acc. final | reload | latency b{} | speed-up | MAC "
             "reduction | ratio |".format(results["latency_batch"]), "|" + "---|" * 11,
             f"| teacher | – | {t['macs'] / 1e6:.2f} M | {t['params'] / 1e3:.0f} k | – | {t['accuracy']:.2f} % | – | "
             f"{t['latency_ms']:.1f} ms | 1.00 | 1.00 | – |"]
    for r in sorted(results["runs"], key=lambda r: (-r["budget"], results["methods"].index(r["method"]))):
        lines.append(
            f"| {r['method']} | {r['budget']:g} | {r['macs'] / 1e6:.2f} M | {r['params'] / 1e3:.0f} k | "
            f"{r['accuracy_after_export']:.2f} % | {r['accuracy']:.2f} % | {'exact' if r['reload_exact'] else 'DIFF'} | "
            f"{r['latency_ms']:.1f} ms | {r['speedup']:.2f} | {r['mac_reduction']:.2f} | "
            f"{r['speedup_over_mac_reduction']:.2f} |")
    return "\n".join(lines)


def plot_accuracy_vs_macs(results: dict[str, Any], path: Path) -> str:
    """Test accuracy against MACs, one line per method over the budgets, the teacher as a star."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = results["teacher"]
    for method in results["methods"]:
        rows = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["macs"])
        if rows:
            style = "o-" if not method.startswith("tp_") else "s--"
            ax.plot([r["macs"] / 1e6 for r in rows], [r["accuracy"] for r in rows], style, label=method)
    ax.plot([t["macs"] / 1e6], [t["accuracy"]], "k*", ms=12, label="teacher")
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['arch']}: accuracy vs MACs at equal budgets and steps\n"
                 f"({results.get('data', DATA_NOTE)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write(results: dict[str, Any], out: Path) -> list[str]:
    """Write ``results.json``, ``table.txt``, ``accuracy_vs_macs.png`` and per-budget regularizer comparisons of the
    mask-decay runs (``compare-<budget>.png``, from their ``history.json``). Returns the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    (out / "table.txt").write_text(table(results) + "\n")
    plots = [plot_accuracy_vs_macs(results, out / "accuracy_vs_macs.png")]
    for budget in sorted({r["budget"] for r in results["runs"]}, reverse=True):
        dirs = {r["method"]: out / r["dir"] for r in results["runs"]
                if r["budget"] == budget and (out / r["dir"] / "history.json").is_file()}
        if dirs:
            plots.append(md.plots.compare(dirs, out / f"compare-{budget:g}.png",
                                          title=f"mask decay at {budget:g} of the teacher's MACs"))
    plots += [str(out / r["dir"] / "masks.png") for r in results["runs"] if (out / r["dir"] / "masks.png").is_file()]
    return plots


def redraw(run_dir: Path, as_markdown: bool = False) -> tuple[str, list[str]]:
    """Table (text or Markdown) and plots again from a run folder's ``results.json``."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a folder written by `python -m maskdecay_examples.resnet prune`")
    results = json.loads(path.read_text())
    return (markdown(results) if as_markdown else table(results)), write(results, run_dir)
