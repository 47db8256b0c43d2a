"""The EVC mask-decay study: students by mask decay (each regularizer) vs from scratch vs one-shot pruning, and RRL.

``python -m maskdecay_examples.evc.training.study run --teacher CKPT --out DIR`` trains and evaluates every run as a
separate ``evc`` process (``evc decay`` / ``evc train`` / ``evc rrl`` / ``evc eval``), several at a time (``--jobs``), each
as soon as what it needs exists; a finished run (its output file exists) is skipped, so an interrupted study
resumes. ``--deadline`` stops starting new work after that many seconds (for time-limited machines).
``python -m maskdecay_examples.evc.training.study report DIR`` writes the tables (BD-rate vs the teacher, "gap
closed") and the plots (RD curves per student, RRL levels, mask trajectories per regularizer) from the run folders.

Runs, for every student (``--students``, default MM and SS) and seed (``--seeds``):

* ``<student>-<reg>-s<seed>``: ``evc decay --regularizer <reg>`` (sparsity, l1, l2, hard): the config's decay and
  fine-tune steps;
* ``<student>-oneshot-s<seed>``: one-shot pruning + fine-tuning: the same command with ``--steps 1`` (the plan's
  channels, chosen by the same importance, are cut after one step) and the remaining steps as fine-tuning;
* ``<student>-scratch-s<seed>``: ``evc train`` of the plain student from random weights (the scratch config) for
  the same total number of steps; ``scratch_long`` trains it for the teacher's steps plus those (the compute the
  decayed student has seen, teacher included);
* ``rrl-<student>-s<seed>`` / ``rrl_oneshot-...``: ``evc rrl`` on the sparsity student, levels decayed from the
  teacher's encoder (or cut one-shot), evaluated per level (``--enc-id k``) and best-of-all.

Every model is evaluated on the full Kodak set at the 4 anchor rates with real bitstreams (``evc eval``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import maskdecay as md

from .config import load_config
from .metrics import bd_or_nan, load_results, plot_rd

log = logging.getLogger(__name__)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
METHODS = ("sparsity", "l1", "l2", "hard", "oneshot", "scratch", "scratch_long")
REGULARIZERS = ("sparsity", "l1", "l2", "hard")


@dataclass
class Job:
    """One ``evc`` command; done when ``output`` exists; runs once every path in ``needs`` exists."""

    name: str
    argv: list[str]
    output: str
    needs: list[str] = field(default_factory=list)


def plan_jobs(a: argparse.Namespace) -> list[Job]:
    """Every training and evaluation job of the study, in priority order."""
    py = [sys.executable, "-m", "maskdecay_examples.evc", "--debug"]
    out = a.out
    dc = load_config(a.student_config, a.overrides).decay
    teacher_steps = load_config(a.scratch_config, a.overrides).train.steps
    total = dc.steps + dc.finetune_steps
    # the step counts go on the command line (--steps / --finetune-steps), where one-shot runs change them; a
    # --set of the same keys would win over those flags
    step_keys = ("decay.steps=", "decay.finetune_steps=")
    data = [f"data.train={json.dumps(a.train_data)}", f"val.data={json.dumps(a.kodak)}",
            *(o for o in a.overrides if not o.replace(" ", "").startswith(step_keys))]
    steps = ["--steps", str(dc.steps), "--finetune-steps", str(dc.finetune_steps)]
    oneshot = ["--steps", "1", "--finetune-steps", str(total - 1)]

    def sets(seed: int) -> list[str]:
        return [x for s in [*data, f"train.seed={seed}"] for x in ("--set", s)]

    def ev(name: str, model: str, extra: tuple[str, ...] = ()) -> Job:
        j = os.path.join(out, "eval", f"{name}.json")
        argv = [*py, "eval", "--dataset", a.kodak, "--model", model, "--json", j, "--rates", "4", "--name", name,
                "--device", a.device, "--threads", "1", *extra, *a.eval_args]
        return Job(f"eval {name}", argv, j, [model])

    train: list[Job] = []
    evals: list[Job] = [ev("teacher", a.teacher)]
    for seed in a.seeds:
        for st in a.students:
            for m in a.methods:
                name = f"{st}-{m}-s{seed}"
                d = os.path.join(out, name)
                if m in REGULARIZERS or m == "oneshot":
                    argv = [*py, "decay", "--config", a.student_config, "--teacher", a.teacher, "--student",
                            f"EVC_{st}", "--out", d, "--no-progress", "--resume", *sets(seed)]
                    argv += ["--regularizer", "sparsity", *oneshot] if m == "oneshot" else ["--regularizer", m, *steps]
                    model = os.path.join(d, "student.pt")
                else:
                    n = total if m == "scratch" else total + teacher_steps
                    argv = [*py, "train", "--config", a.scratch_config, "--out", d, "--no-progress", "--resume",
                            *sets(seed), "--set", f"model.arch=mini_EVC_{st}", "--set", f"train.steps={n}"]
                    model = os.path.join(d, "model.pt")
                train.append(Job(name, argv, model))
                evals.append(ev(name, model))
            if a.rrl and st in ("SS", "SL") and "sparsity" in a.methods:
                base = os.path.join(out, f"{st}-sparsity-s{seed}", "student.pt")
                for variant, extra in (("rrl", steps), ("rrl_oneshot", oneshot)):
                    name = f"{variant}-{st}-s{seed}"
                    d = os.path.join(out, name)
                    model = os.path.join(d, "scalable.pt")
                    train.append(Job(name, [*py, "rrl", "--config", a.student_config, "--teacher", a.teacher,
                                            "--base", base, "--out", d, "--no-progress", "--resume", *sets(seed),
                                            *extra], model, [base]))
                    for k in range(4):
                        evals.append(ev(f"{name}-level{k + 1}", model, ("--enc-id", str(k))))
                    evals.append(ev(f"{name}-best", model))
    # RRL first among the trainings: it is the longest chain (it waits for its base student)
    train.sort(key=lambda j: not j.name.startswith("rrl"))
    return train + evals


def _pack(out: str, tar_path: str) -> None:
    """Results (JSON, logs, plans, histories; no checkpoints) of ``out`` into one tar file, atomically."""
    tmp = tar_path + ".tmp"
    with tarfile.open(tmp, "w") as t:
        for root, _, files in os.walk(out):
            for f in files:
                if f.endswith((".json", ".jsonl", ".log", ".txt")):
                    p = os.path.join(root, f)
                    t.add(p, arcname=os.path.relpath(p, os.path.dirname(out.rstrip("/")) or "."))
    os.replace(tmp, tar_path)


def run_jobs(jobs: list[Job], n: int, deadline: float | None, log_dir: str, pack: str | None, out: str) -> int:
    """Run the jobs, ``n`` at a time, each once its inputs exist; returns the number of failures."""
    os.makedirs(log_dir, exist_ok=True)
    t0 = time.time()
    todo = [j for j in jobs if not os.path.exists(j.output)]
    running: dict[Future[int], Job] = {}
    failed: set[str] = set()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def launch(pool: ThreadPoolExecutor) -> None:
        while len(running) < n and (deadline is None or time.time() - t0 < deadline):
            ready = [j for j in todo if all(os.path.exists(p) for p in j.needs)]
            if not ready:
                return
            j = ready[0]
            todo.remove(j)
            if os.path.exists(j.output):  # written meanwhile (e.g. by another study or by hand)
                continue
            lf = os.path.join(log_dir, j.name.replace(" ", "_") + ".log")

            def go(j: Job = j, lf: str = lf) -> int:
                with open(lf, "w") as f:
                    return subprocess.call(j.argv, stdout=f, stderr=subprocess.STDOUT, env=env)
            running[pool.submit(go)] = j
            log.info("[%5.0fs] start %s", time.time() - t0, j.name)

    with ThreadPoolExecutor(n) as pool:
        launch(pool)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                j = running.pop(fut)
                rc = fut.result()
                ok = rc == 0 and os.path.exists(j.output)
                log.info("[%5.0fs] %s %s (exit %d)", time.time() - t0, "done" if ok else "FAILED", j.name, rc)
                if not ok:
                    failed.add(j.output)
            # a job whose input failed can never start
            for j in [j for j in todo if any(p in failed for p in j.needs)]:
                todo.remove(j)
                failed.add(j.output)
                log.info("skip %s (an input failed)", j.name)
            if pack:
                _pack(out, pack)
            launch(pool)
    for j in todo:
        log.info("not started (deadline): %s", j.name)
    return len(failed)


# ----------------------------------------------------------------------------------------------------- report
def _fmt(v: float, spec: str, unit: str = "") -> str:
    return "n/a" if math.isnan(v) else format(v, spec) + unit


def _rd_cells(teacher: dict[str, Any], r: dict[str, Any]) -> tuple[str, float]:
    """The table cells "bpp | PSNR | BD-rate | BD-PSNR" of one result against the teacher, and its BD-PSNR."""
    bdr, bdp = (0.0, 0.0) if r is teacher else bd_or_nan(teacher, r)
    bpp = " / ".join(f"{v:.3f}" for v in r["results"]["bpp"])
    ps = " / ".join(f"{v:.2f}" for v in r["results"]["psnr-rgb"])
    return f"{bpp} | {ps} | {_fmt(bdr, '+.1f', ' %')} | {_fmt(bdp, '+.2f', ' dB')}", bdp


def report(out: str, md_path: str | None, img_dir: str | None) -> str:
    """Markdown tables + plots from a study folder; returns the markdown."""
    ev = os.path.join(out, "eval")
    res = {f[:-5]: load_results(os.path.join(ev, f)) for f in sorted(os.listdir(ev)) if f.endswith(".json")}
    if "teacher" not in res:
        raise SystemExit(f"{ev}/teacher.json missing: run the study first")
    teacher = res["teacher"]
    img = img_dir or out
    os.makedirs(img, exist_ok=True)
    lines = ["| run | bpp (4 anchors) | PSNR dB | BD-rate vs teacher | BD-PSNR vs teacher | gap closed vs scratch | "
             "vs scratch_long |", "|---|---|---|---:|---:|---:|---:|"]

    def row(name: str, r: dict[str, Any], scratch: dict[str, float]) -> str:
        """Gap closed = 1 - BD-PSNR(run) / BD-PSNR(scratch) (BD-PSNR: BD-rate is undefined for these flat curves
        whenever the PSNR ranges do not overlap)."""
        cells, bdp = _rd_cells(teacher, r)
        gaps = []
        for key in ("scratch", "scratch_long"):
            s = scratch.get(key, math.nan)
            ok = name != "teacher" and "-scratch" not in name and not math.isnan(s) and s < 0
            gaps.append(_fmt(100 * (1 - bdp / s), ".0f", " %") if ok else "–")
        return f"| {name} | {cells} | {gaps[0]} | {gaps[1]} |"

    lines.append(row("teacher", teacher, {}))
    groups: dict[str, list[str]] = {}
    for name in res:
        if name != "teacher" and not name.startswith("rrl"):
            groups.setdefault(name.split("-")[0] + "-" + name.split("-")[-1], []).append(name)
    for g, names in sorted(groups.items()):
        st, seed = g.split("-")
        scratch = {k: bd_or_nan(teacher, res[f"{st}-{k}-{seed}"])[1] for k in ("scratch", "scratch_long")
                   if f"{st}-{k}-{seed}" in res}
        order = sorted(names, key=lambda n: METHODS.index(n.split("-")[1]) if n.split("-")[1] in METHODS else 99)
        lines += [row(n, res[n], scratch) for n in order]
        plot_rd([teacher, *[res[n] for n in order]], os.path.join(img, f"study_rd_{st}_{seed}.png"),
                title=f"mini_EVC_{st} students of the mini teacher (Kodak, real bitstreams, {seed})")
    rrl = sorted(n for n in res if n.startswith("rrl"))
    if rrl:
        lines += ["", "| RRL run | bpp | PSNR dB | BD-rate vs teacher | BD-PSNR |", "|---|---|---|---:|---:|"]
        lines += [f"| {n} | {_rd_cells(teacher, res[n])[0]} |" for n in rrl]
        for base in sorted({n.rsplit("-", 1)[0] for n in rrl}):
            curves = [res[n] for n in rrl if n.rsplit("-", 1)[0] == base]
            plot_rd([teacher, *curves], os.path.join(img, f"study_{base}.png"), title=f"{base}: levels and best-of-4")
    hists = {}
    for name in sorted(os.listdir(out)):
        h = os.path.join(out, name, "history.json")
        if os.path.isfile(h):
            hists[name] = h
            md.plots.mask_trajectories(h, os.path.join(img, f"study_masks_{name}.png"), title=name)
    for g in sorted({n.split("-")[0] + "-" + n.split("-")[-1] for n in hists}):
        st, seed = g.split("-")
        sub = {n.split("-")[1]: hists[n] for n in hists if n.startswith(st + "-") and n.endswith("-" + seed)}
        if len(sub) > 1:
            md.plots.compare(sub, os.path.join(img, f"study_compare_{st}_{seed}.png"),
                             title=f"mini_EVC_{st}: regularizers compared ({seed})")
    text = "\n".join(lines) + "\n"
    if md_path:
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.training.study",
                                 description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate every run (resumable)")
    r.add_argument("--teacher", required=True, help="teacher checkpoint (evc train output, e.g. mini_EVC_LL)")
    r.add_argument("--out", default="runs/evc/study")
    r.add_argument("--students", default="MM,SS")
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--seeds", default="0")
    r.add_argument("--no-rrl", dest="rrl", action="store_false")
    r.add_argument("--student-config", default=os.path.join(CONFIGS, "mini_student.yaml"))
    r.add_argument("--scratch-config", default=os.path.join(CONFIGS, "mini_teacher.yaml"))
    r.add_argument("--train-data", default="../shared/data/train/imagenet_samples")
    r.add_argument("--kodak", default="../shared/data/kodak")
    r.add_argument("--device", default="cpu", help="device of the evaluations (training: the configs' train.device)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every training run (e.g. train.device=cuda)")
    r.add_argument("--eval-arg", dest="eval_args", action="append", default=[],
                   help="extra argument of every evc eval (e.g. --eval-arg=--limit=2)")
    r.add_argument("--jobs", type=int, default=2, help="processes at a time (default 2)")
    r.add_argument("--deadline", type=float, default=None, help="start nothing new after this many seconds")
    r.add_argument("--pack", default=None, help="after every finished job, pack the results into this tar file")
    p = sub.add_parser("report", help="tables and plots from a study folder")
    p.add_argument("out")
    p.add_argument("--md", default=None, help="write the markdown tables here")
    p.add_argument("--img", default=None, help="folder for the plots (default: the study folder)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.cmd == "report":
        print(report(a.out, a.md, a.img))
        return 0
    a.students = [s.strip() for s in a.students.split(",") if s.strip()]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.seeds = [int(s) for s in a.seeds.split(",")]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; known: {', '.join(METHODS)}")
    for path in (a.teacher, a.train_data, a.kodak):
        if not os.path.exists(path):
            ap.error(f"{path}: not found")
    t0 = time.time()
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    jobs = plan_jobs(a)
    failures = run_jobs(jobs, a.jobs, a.deadline, os.path.join(a.out, "logs"), a.pack, a.out)
    log.info("study: %d jobs, %d failed, %.0f s", len(jobs), failures, time.time() - t0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
