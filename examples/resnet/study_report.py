"""``python -m maskdecay_examples.resnet study-report OUT``: the tables and plots of a study folder written by ``python -m maskdecay_examples.resnet study``.

Prints Markdown (and writes it to ``OUT/report.md``): the teacher, the main table (every method at every budget:
test accuracy on the full test split, MACs, parameters, measured CPU speed-up), the strength sweeps, mean ± standard
deviation over seeds, the sparsity-loss ablation. Plots go to ``OUT/plots/``: the teacher's learning curve, accuracy
against MACs with error bars over seeds, and the removed masks' trajectories against the ceiling. Latency is measured
here, on this machine, teacher and students interleaved. ``--docs PAGE`` also puts the tables and plots into a
Markdown page, between its :data:`BEGIN` and :data:`END` lines (the plots copied to ``img/`` beside the page).
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import maskdecay as md

from ..hostinfo import cpu_label, threads_label
from .data import DATA_NOTE
from .models import build
from .report import latencies
from .study import load_student

#: the lines of a Markdown page between which ``--docs`` puts the report
BEGIN, END = "<!-- study-report:begin -->", "<!-- study-report:end -->"

ABLATION = {"hard": "ceiling only (hard decay)", "sparsity_loss_only": "loss only (no ceiling)",
            "sparsity": "loss + ceiling (sparsity loss)"}


def chosen_by(method: str, select: str, prune: dict[str, Any]) -> str:
    """Who picks the channels a method removes (a column of the main table)."""
    if method.startswith("tp_"):
        return "TP ranking, after sparse training" if method == "tp_groupnorm" else "TP ranking, on the teacher"
    if select == "cut":
        return "the penalty, at the cut"
    return f"plan ({prune['importance']}), on the teacher"


def _acc(v: float | None) -> str:
    """An accuracy, or a dash where there is none (no validation split)."""
    return "–" if v is None else f"{v:.2f}"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "–"
    m, sd = _mean_sd(values)
    return f"{m:.2f} ± {sd:.2f} (n={len(values)})" if len(values) > 1 else f"{m:.2f} (n=1)"


def _se(acc: float, n: int) -> float:
    """Standard error (points) of an accuracy ``acc`` (%) measured on ``n`` images."""
    return 100.0 * (acc / 100.0 * (1.0 - acc / 100.0) / n) ** 0.5


def load(out: Path) -> dict[str, Any]:
    """``summary.json`` and ``teacher.json`` of a study folder."""
    s, t = out / "summary.json", out / "teacher.json"
    if not s.is_file() or not t.is_file():
        raise FileNotFoundError(f"{out}: no summary.json/teacher.json (run `python -m maskdecay_examples.resnet study` first)")
    return {**json.loads(s.read_text()), "teacher": json.loads(t.read_text())}


def mask_gap(history: dict[str, Any]) -> dict[str, float]:
    """How far the removed masks ran below the study's cosine over the whole decay phase: the largest and the mean
    gap ``cosine - removed_mean`` over the recorded steps before the cut, and the largest removed mask just before it
    (what the cut removed)."""
    n = history["steps"]
    gaps = [md.schedules.cosine(st, n) - r for st, r in zip(history["step"], history["removed_mean"]) if st < n]
    return {"max_gap": max(gaps, default=0.0), "mean_gap": statistics.fmean(gaps) if gaps else 0.0,
            "cut_jump": history.get("cut_jump") or 0.0}


def compute(out: Path) -> dict[str, Any]:
    """Wall time of every pruning run in ``out/runs`` (each decay counted once, every fine-tuning branch), and
    ``{machine: number of phases}`` over the decay and fine-tuning phases that recorded where they ran."""
    total, n = 0.0, 0
    machines: dict[str, int] = {}
    for run in sorted((out / "runs").iterdir()):
        results = [json.loads(f.read_text()) for f in sorted(run.glob("result-ft*.json"))]
        if results:
            n += 1
            total += results[0].get("decay_seconds", 0.0) + sum(r.get("finetune_seconds", 0.0) for r in results)
            for where in [results[0].get("decay_machine")] + [r.get("machine") for r in results]:
                if where:
                    where = re.sub(r"\b1 threads\b", "1 thread", where)
                    machines[where] = machines.get(where, 0) + 1
    return {"runs": n, "seconds": total, "machines": machines}


def sweep_points(out: Path, summary: dict[str, Any], method: str, budget: float, select: str | None = None
                 ) -> list[dict[str, Any]]:
    """The finished sweep points of ``method`` at ``budget`` (seed of the study; only those that chose their units
    the way ``select`` says, if given), by strength: each its short fine-tuning's result plus ``history`` (the mask
    history of its decay, or None)."""
    cfg = summary["config"]
    epochs, seed = cfg["prune"]["sweep_finetune_epochs"], cfg["seed"]
    points = []
    for run in (out / "runs").glob(f"{method}-{budget:g}-s*-seed{seed}"):
        res, hist = run / f"result-ft{epochs}.json", run / "history.json"
        result = json.loads(res.read_text()) if res.is_file() else None
        if result is not None and select in (None, result.get("select", "plan")):
            points.append({**result, "history": json.loads(hist.read_text()) if hist.is_file() else None})
    return sorted(points, key=lambda q: q["strength"])


def main_finals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The finals of the main table and the seeds: not the ablation's arms, except the seeds of an arm that runs the
    way its method's main run chose (those are the method's own seeds), each run once."""
    seed = summary["config"]["seed"]
    way = {(f["method"], f["budget"]): f.get("select", "plan") for f in summary["finals"]
           if "arm" not in f and f["seed"] == seed}
    runs: dict[str, dict[str, Any]] = {}
    for f in summary["finals"]:
        if "arm" not in f or f.get("select", "plan") == way.get((f["method"], f["budget"])):
            runs.setdefault(f["run"], f)
    return list(runs.values())


def _ablation_runs(summary: dict[str, Any], method: str, budget: float) -> list[dict[str, Any]]:
    """The finals of an ablation variant at ``budget``, one per seed: its ablation arm where it has one, else its
    plan-way finals."""
    arms = [f for f in summary["finals"] if f["method"] == method and f["budget"] == budget and "arm" in f]
    runs = arms or [f for f in main_finals(summary) if f["method"] == method and f["budget"] == budget
                    and f.get("select", "plan") == "plan"]
    return sorted(runs, key=lambda f: f["seed"])


def _seed0(summary: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    seed = summary["config"]["seed"]
    return {(f["method"], f["budget"]): f for f in main_finals(summary) if f["seed"] == seed}


def _by_seed(summary: dict[str, Any]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for f in main_finals(summary):
        out.setdefault((f["method"], f["budget"]), []).append(f)
    return out


def measure_speed(out: Path, summary: dict[str, Any], batch: int, rounds: int, runs: int) -> dict[str, float]:
    """Interleaved CPU latency (ms, batch ``batch``) of the teacher and every seed-0 final student.

    Latency depends on the layer shapes only, so students of identical shapes (the mask-decay students of one
    budget share the plan's) are timed once and share that measurement: timing noise cannot tell them apart."""
    arch = summary["arch"]
    teacher = build(arch)
    teacher.load_state_dict(torch.load(out / "teacher.pt", map_location="cpu", weights_only=True)["state_dict"])
    models: dict[str, nn.Module] = {"teacher": teacher.eval().to(memory_format=torch.channels_last)}
    same: dict[str, str] = {"teacher": "teacher"}  # run -> the run timed for its shapes
    first: dict[tuple, str] = {}
    for f in _seed0(summary).values():
        model = load_student(out / "runs" / f["run"], arch)
        shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
        same[f["run"]] = first.setdefault(shapes, f["run"])
        if same[f["run"]] == f["run"]:
            models[f["run"]] = model.to(memory_format=torch.channels_last)
    lat = latencies(models, batch, rounds, runs)
    return {run: lat[timed] for run, timed in same.items()}


def tables(out: Path, summary: dict[str, Any], lat: dict[str, float] | None, lat_note: str = "") -> str:
    """The Markdown report (``lat_note``: how ``lat`` was measured, printed under the main table)."""
    t = summary["teacher"]
    last = t["curve"][-1]
    cfg = summary["config"]
    p = cfg["prune"]
    lines = [f"Data: {summary.get('data', DATA_NOTE)}; {t['n_train']:,} training, {t['n_val']:,} validation (held "
             f"out of the training set), {t['n_test']:,} test images. Machine: {t['machine']}, "
             f"{threads_label(t['threads'])}.", "",
             f"**Teacher** ({summary['arch']}, {len(t['curve'])} epochs, {t['train_seconds'] / 60:.0f} min): "
             f"**{last['test_accuracy']:.2f} %** test, {_acc(last['val_accuracy'])} % validation, "
             f"{summary['teacher_macs'] / 1e6:.2f} M MACs.", ""]
    seed0, by_seed = _seed0(summary), _by_seed(summary)
    methods = [m for m in p["methods"]]
    head = "| method | channels chosen by | budget | strength | test acc. | acc. after cut (val) | MACs | params |"
    sep = "|---|---|---|---|---|---|---|---|"
    if lat:
        head += " CPU latency | speed-up |"
        sep += "---|---|"
    lines += ["**Main table** (seed 0; test accuracy on the full test split; strength chosen on validation):", "",
              head, sep]
    teacher_params = sum(q.numel() for q in build(summary["arch"]).parameters())
    lines.append(f"| teacher | – | 1 | – | {last['test_accuracy']:.2f} | – | {summary['teacher_macs'] / 1e6:.2f} M | "
                 f"{teacher_params / 1e3:.0f} k |" + (f" {lat['teacher']:.2f} ms | 1.00 |" if lat else ""))
    for budget in p["budgets"]:
        for m in methods:
            f = seed0.get((m, budget))
            if f is None:
                lines.append(f"| {m} | – | {budget:g} | (not run yet) | | | | |" + (" | |" if lat else ""))
                continue
            s = "–" if f["strength"] is None else f"{f['strength']:g}"
            row = (f"| {m} | {chosen_by(m, f.get('select', 'plan'), p)} | {budget:g} | {s} | {f['test_accuracy']:.2f} | "
                   f"{_acc(f['accuracy_after_cut_val'])} | "
                   f"{f['macs'] / 1e6:.2f} M | {f['params'] / 1e3:.0f} k |")
            if lat:
                row += f" {lat[f['run']]:.2f} ms | {lat['teacher'] / lat[f['run']]:.2f} |"
            lines.append(row)
    if lat and lat_note:
        lines += ["", lat_note]
    sweep_budgets = p.get("sweep_budgets") or p["budgets"]
    swept = [(m, budget, f) for (m, budget), f in seed0.items() if f["sweep"] and budget in sweep_budgets]
    unswept = [b for b in p["budgets"] if b not in sweep_budgets]
    if swept:
        lines += ["", "**Strength sweeps** (validation accuracy after the decay and 1 epoch of fine-tuning; best in "
                  "bold; for the penalties swept both ways, *plan*: the plan's channels go, *cut*: those the penalty "
                  "shrank most (the sparsity loss then on every channel, without its ceiling); for hard decay, the "
                  "fraction of the decay phase its schedule takes; a MAC count in brackets marks a point whose "
                  "student missed the budget by more than 2 %" + (
                      f"; the other budgets use the strengths chosen at {sweep_budgets[0]:g}" if unswept else "")
                  + "):", "",
                  "| method | budget | strength → validation accuracy |", "|---|---|---|"]
    for m, budget, f in swept:
        modes = {q.get("select", "plan") for q in f["sweep"]}
        macs = {(q["strength"], q.get("select", "plan")): q["macs"] for q in sweep_points(out, summary, m, budget)}
        cells = []
        for q in f["sweep"]:
            mode = q.get("select", "plan")
            txt = (f"{mode} " if len(modes) > 1 else "") + f"{q['strength']:g} → {q['val_accuracy']:.2f}"
            point_macs = macs.get((q["strength"], mode))
            if point_macs is not None and abs(point_macs / (budget * summary["teacher_macs"]) - 1) > 0.02:
                txt += f" ({point_macs / 1e6:.2f} M MACs)"
            best = q["strength"] == f["strength"] and mode == f.get("select", "plan")
            cells.append(f"**{txt}**" if best else txt)
        lines.append(f"| {m} | {budget:g} | {', '.join(cells)} |")
    multi = {k: v for k, v in by_seed.items() if len(v) > 1}
    if multi:
        lines += ["", "**Seeds** (same teacher; seeds change the batches and augmentation of the pruning run):", "",
                  "| method | budget | seeds | test acc. mean ± sd | validation acc. mean ± sd |", "|---|---|---|---|---|"]
        for (m, budget), fs in sorted(multi.items(), key=lambda kv: -_mean_sd([f["test_accuracy"] for f in kv[1]])[0]):
            lines.append(f"| {m} | {budget:g} | {', '.join(str(f['seed']) for f in fs)} | "
                         f"{_pm([f['test_accuracy'] for f in fs])} | {_pm([f['val_accuracy'] for f in fs])} |")
    abl = {(m, b): rs for m in ABLATION for b in p["ablation_budgets"] if (rs := _ablation_runs(summary, m, b))}
    if abl:
        lines += ["", "**Sparsity-loss ablation** (the plan's channels; seed-0 run's removed masks against the cosine "
                  "over the whole decay phase; gap = that cosine − mean removed mask, over the decay):", "",
                  "| variant | budget | strength | test acc. (seed 0) | test acc. over seeds | acc. after cut (val) | "
                  "largest gap | mean gap | cut jump |", "|---|---|---|---|---|---|---|---|---|"]
        for (m, b), rs in abl.items():
            f = rs[0]
            hist = out / "runs" / f["run"] / "history.json"
            if f["seed"] != cfg["seed"] or not hist.is_file():
                continue
            g = mask_gap(json.loads(hist.read_text()))
            s = "–" if f["strength"] is None else f"{f['strength']:g}"
            lines.append(f"| {ABLATION[m]} | {b:g} | {s} | {f['test_accuracy']:.2f} | "
                         f"{_pm([r['test_accuracy'] for r in rs])} | {_acc(f['accuracy_after_cut_val'])} | "
                         f"{g['max_gap']:.4f} | {g['mean_gap']:.4f} | {g['cut_jump']:.4f} |")
    for b in p["ablation_budgets"]:
        pts = [(m, q) for m in ABLATION for q in sweep_points(out, summary, m, b, "plan")]
        if not pts:
            continue
        se = _se(pts[0][1]["val_accuracy"], t["n_val"])
        lines += ["", f"**What the strength does** at {b:g} (seed {cfg['seed']}; every point the same decay steps and "
                  f"{p['sweep_finetune_epochs']} epoch(s) of fine-tuning, validation accuracy, whose standard error "
                  f"on {t['n_val']:,} images is about {se:.1f} points; for hard decay the strength is the fraction "
                  "of the decay phase its cosine takes, the removed masks are 0 from there on; gap = full-phase "
                  "cosine − mean removed mask):", "",
                  "| variant | strength | validation acc. | largest gap | mean gap | cut jump |", "|---|---|---|---|---|---|"]
        for m, q in pts:
            g = mask_gap(q["history"]) if q["history"] else None
            gaps = f"{g['max_gap']:.4f} | {g['mean_gap']:.4f} | {g['cut_jump']:.4f}" if g else "– | – | –"
            lines.append(f"| {ABLATION[m]} | {q['strength']:g} | {q['val_accuracy']:.2f} | {gaps} |")
    plan = out / "plan.json"
    if plan.is_file():
        pl = json.loads(plan.read_text())
        lines += ["", f"Schedule sized to {pl['fit_minutes']:g} minutes on {pl['device']} from measured steps "
                  f"({1e3 * pl['seconds_per_step']['teacher']:.1f} / {1e3 * pl['seconds_per_step']['decay']:.1f} / "
                  f"{1e3 * pl['seconds_per_step']['student']:.1f} ms per teacher / decay / student step): "
                  f"{pl['decay_epochs']} decay + {pl['finetune_epochs']} fine-tuning epochs per method."]
    runs = compute(out)
    where = "; ".join(f"{m} ({k} phases)" for m, k in sorted(runs["machines"].items(), key=lambda kv: -kv[1]))
    lines += ["", f"Compute: teacher {t['train_seconds'] / 3600:.1f} h on {t['machine']}, "
              f"{threads_label(t['threads'])}; "
              f"{runs['runs']} pruning runs (sweep points, finals, seeds) {runs['seconds'] / 3600:.1f} h"
              + (f", their decay and fine-tuning phases on: {where}." if where else ".")]
    return "\n".join(lines)


def plot_all(out: Path, summary: dict[str, Any]) -> list[str]:
    """Learning curve, accuracy vs MACs (error bars over seeds), removed-mask trajectories; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = []
    t = summary["teacher"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [c["epoch"] for c in t["curve"]]
    ax[0].plot(ep, [c["train_loss"] for c in t["curve"]], "k-")
    ax[0].set(xlabel="epoch", ylabel="training loss", title="teacher: training loss")
    ax[1].plot(ep, [c["val_accuracy"] for c in t["curve"]], "b-", label="validation (5k held out)")
    ax[1].plot(ep, [c["test_accuracy"] for c in t["curve"]], "r-", label="test (10k)")
    ax[1].set(xlabel="epoch", ylabel="accuracy (%)", title="teacher: accuracy")
    ax[1].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(f"{summary['arch']} on {summary.get('data', DATA_NOTE)}", fontsize=9)
    fig.tight_layout()
    paths.append(str(plots / "teacher_curve.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = summary["config"]["prune"]["methods"] + ["sparsity_loss_only"]
    for i, m in enumerate(methods):
        spread = 1 + 0.012 * (i - (len(methods) - 1) / 2)  # side by side at each budget, not on top of each other
        pts = []
        for (mm, b), fs in sorted(_by_seed(summary).items(), key=lambda kv: kv[0][1]):
            if mm == m:
                mean, sd = _mean_sd([f["test_accuracy"] for f in fs])
                pts.append((fs[0]["macs"] / 1e6 * spread, mean, sd))
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, fmt="s--" if m.startswith("tp_") else "o-", capsize=3, label=m)
    ax.plot([summary["teacher_macs"] / 1e6], [t["curve"][-1]["test_accuracy"]], "k*", ms=12, label="teacher")
    ax.set(xlabel="MACs per image (M)", ylabel="test accuracy (%)")
    ax.set_title(f"{summary['arch']}: accuracy vs MACs, equal steps and schedule; error bars: sd over seeds\n"
                 "methods drawn side by side at each budget, 1.2 % of its MACs apart\n"
                 f"({summary.get('data', DATA_NOTE)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(plots / "accuracy_vs_macs.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    seed0 = _seed0(summary)
    styles = {"hard": ("-", "C0"), "sparsity": ("-", "C1"), "sparsity_loss_only": ("--", "C2")}
    for budget in summary["config"]["prune"]["ablation_budgets"]:
        points = {m: [q for q in sweep_points(out, summary, m, budget, "plan") if q["history"]] for m in ABLATION}
        if not any(points.values()):
            continue
        fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
        h0 = next(q["history"] for pts in points.values() for q in pts)
        full = [md.schedules.cosine(st, h0["steps"]) for st in h0["step"]]
        for a, key, label in ((ax[0], "removed_mean", "mean removed mask"), (ax[1], "removed_max", "largest removed mask")):
            a.plot([q / h0["steps"] for q in h0["step"]], full, "k:", lw=2, label="cosine over the whole phase")
            for m, (style, color) in styles.items():
                for i, q in enumerate(points[m]):
                    h = q["history"]
                    name = f"hard, within {q['strength']:g}" if m == "hard" else f"{m} λ={q['strength']:g}"
                    a.plot([st / h["steps"] for st in h["step"]], h[key], style, color=color, lw=1,
                           alpha=0.35 + 0.65 * (i + 1) / len(points[m]), label=name)
            a.set(xlabel="fraction of the decay phase", title=label)
            a.grid(alpha=0.3)
            a.legend(fontsize=6)
        n_val = t["n_val"]
        for m, fmt in (("sparsity", "o-"), ("sparsity_loss_only", "s--")):
            if points[m]:
                acc = [q["val_accuracy"] for q in points[m]]
                ax[2].errorbar([q["strength"] for q in points[m]], acc, yerr=[_se(a, n_val) for a in acc], fmt=fmt,
                               color=styles[m][1], capsize=3, label=ABLATION[m])
        for i, q in enumerate(points["hard"]):
            acc = q["val_accuracy"]
            ax[2].axhline(acc, color="C0", lw=1.5, ls=("-", "--", ":", "-.")[i % 4],
                          label=f"hard decay within {q['strength']:g} of the phase")
        best = max(points["hard"], key=lambda q: q["val_accuracy"], default=None)
        if best is not None:
            acc = best["val_accuracy"]
            ax[2].axhspan(acc - _se(acc, n_val), acc + _se(acc, n_val), color="C0", alpha=0.12)
        ax[2].set(xscale="log", xlabel="strength λ", ylabel="validation accuracy (%)",
                  title=f"after the decay + {summary['config']['prune']['sweep_finetune_epochs']} fine-tuning "
                        f"epoch(s)\nbars: ±1 standard error on {n_val:,} validation images")
        ax[2].grid(alpha=0.3)
        ax[2].legend(fontsize=7)
        fig.suptitle(f"sparsity-loss ablation at {budget:g} of the teacher's MACs", fontsize=10)
        fig.tight_layout()
        paths.append(str(plots / f"ablation_{budget:g}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for budget in summary["config"]["prune"]["budgets"]:
        runs = {m: out / "runs" / f["run"] for (m, b), f in seed0.items()
                if b == budget and (out / "runs" / f["run"] / "history.json").is_file()}
        if runs:
            paths.append(md.plots.compare(runs, plots / f"masks_{budget:g}.png",
                                          title=f"removed masks at {budget:g} of the teacher's MACs"))
    return paths


def publish(out: Path, text: str, plots: list[str], page: Path) -> None:
    """Put ``text`` and the ``plots`` (copied into ``img/`` next to ``page``, named after the study folder) between
    the :data:`BEGIN` and :data:`END` lines of the Markdown ``page``, replacing what was there."""
    doc = page.read_text()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{page}: needs one {BEGIN!r} line and, after it, one {END!r} line where the report goes")
    img = page.parent / "img"
    img.mkdir(exist_ok=True)
    figures = []
    for q in map(Path, plots):
        shutil.copyfile(q, img / f"{out.name}_{q.name}")
        figures.append(f"![{q.stem.replace('_', ' ')}](img/{out.name}_{q.name})")
    block = "\n\n".join([BEGIN, text, *figures, END])
    page.write_text(doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):])


def main(out: Path, measure: bool = True, batch: int = 64, rounds: int = 7, runs: int = 3,
         docs: Path | None = None) -> str:
    """Write ``report.md`` and the plots of ``out`` (and, with ``docs``, :func:`publish` them into that page);
    returns the Markdown."""
    summary = load(out)
    lat = measure_speed(out, summary, batch, rounds, runs) if measure else None
    note = (f"CPU latency: one eval forward of {batch} images (channels_last) on {cpu_label()}, "
            f"{threads_label(torch.get_num_threads())}; median of {rounds} rounds x {runs} passes, the teacher and the "
            "students timed in turns, in a shuffled order each round (students of identical layer shapes timed once); "
            "speed-up = teacher latency / student latency.")
    text = tables(out, summary, lat, note)
    paths = plot_all(out, summary)
    if docs is not None:
        publish(out, text, paths, docs)
    text += "\n\nPlots: " + ", ".join(str(Path(q).relative_to(out)) for q in paths)
    (out / "report.md").write_text(text + "\n")
    return text
