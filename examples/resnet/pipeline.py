"""``python -m maskdecay_examples.resnet prune``: the teacher, every method at every budget, the table, plots and
JSON in one run folder.

Layout of ``<out>/``: ``config.yaml`` (the validated config), ``teacher.pt``, ``<method>-<budget>/`` per run
(``student.pt``, ``result.json``; mask-decay runs also ``history.json`` and ``masks.png``, which
``maskdecay plot <out>/*-0.5`` redraws), ``results.json``, ``table.txt``, ``accuracy_vs_macs.png``,
``compare-<budget>.png``. A run whose ``result.json`` was written with the same settings is reused, so an interrupted
study resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

import maskdecay as md

from ..hostinfo import cpu_label
from . import methods, report
from .config import Config
from .data import Split, load_any, resolve
from .training import evaluate, teacher

log = logging.getLogger(__name__)


def load_data(cfg: Config) -> tuple[Split, Split]:
    """Train and test splits from the config (decoded tars cached next to the run folder)."""
    train_path, test_path = resolve(cfg.data.path, cfg.data.train, cfg.data.test)
    cache = cfg.out_dir.parent / "cache" if cfg.data.cache else None
    train, test = load_any(train_path, cache, "train"), load_any(test_path, cache, "test")
    return train.subset(cfg.data.train_subset, cfg.seed), test.subset(cfg.data.test_subset, cfg.seed)


def _measure(model: nn.Module) -> dict[str, float]:
    """MACs and parameters of a CPU model."""
    rep = md.profile(model.eval(), methods.example_input(), warmup=0, runs=1)
    return {"macs": rep.macs, "params": rep.params}


def _run_key(cfg: Config, method: str, budget: float) -> dict[str, Any]:
    return {"arch": cfg.model.arch, "seed": cfg.seed, "data": cfg.data.__dict__, "teacher": cfg.teacher.__dict__,
            "prune": {**cfg.prune.__dict__, "budgets": None, "methods": None}, "method": method, "budget": budget}


def _one(cfg: Config, method: str, budget: float, tmodel: nn.Module, train: Split, test: Split,
         out: Path) -> tuple[dict[str, Any], nn.Module]:
    """Run (or reuse) one method at one budget; save, reload and re-evaluate its student."""
    rundir = out / f"{method}-{budget:g}"
    key = _run_key(cfg, method, budget)
    done = rundir / "result.json"
    if done.is_file() and (saved := json.loads(done.read_text())).get("key") == json.loads(json.dumps(key)):
        log.info("%s@%g: reusing %s", method, budget, rundir)
        return saved["row"], methods.load_student(rundir / "student.pt", cfg.model.arch)
    o = methods.run(method, budget, tmodel, cfg, train, test)
    rundir.mkdir(parents=True, exist_ok=True)
    methods.save_student(o, rundir / "student.pt", cfg.model.arch)
    reloaded = methods.load_student(rundir / "student.pt", cfg.model.arch)
    acc_reloaded = evaluate(reloaded.to(cfg.device), test)
    reloaded = reloaded.cpu()
    if o.history is not None:
        (rundir / "history.json").write_text(json.dumps(o.history))
        md.plots.mask_trajectories(o.history, rundir / "masks.png",
                                   title=f"{cfg.model.arch}, {method} at {budget:g} MACs: mask trajectories")
    info = {k: v for k, v in o.info.items() if k != "tp_history"}
    row = {"method": method, "budget": budget, "dir": rundir.name, **_measure(reloaded), **info,
           "accuracy_reloaded": acc_reloaded, "reload_exact": acc_reloaded == o.info["accuracy"]}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "row": row}, indent=1))
    tmp.replace(done)
    log.info("%s@%g: %.2f M MACs, accuracy %.2f %% (after cut %.2f %%), reloaded %.2f %%, %.0f s", method, budget,
             row["macs"] / 1e6, row["accuracy"], row["accuracy_after_export"], acc_reloaded, row["seconds"])
    return row, reloaded


def prune(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """The whole study of ``cfg``; returns ``(results, plot paths)``."""
    t0 = time.perf_counter()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    train, test = load_data(cfg)
    tmodel, tinfo = teacher(cfg, train, test)
    rows, students = [], {"teacher": copy.deepcopy(tmodel).cpu()}
    for budget in cfg.prune.budgets:
        for method in cfg.prune.methods:
            row, student = _one(cfg, method, budget, tmodel, train, test, out)
            rows.append(row)
            students[row["dir"]] = student
    r = cfg.report
    lat = report.latencies(students, r.latency_batch, r.latency_rounds, r.latency_runs, cfg.seed)
    tm = {**_measure(students["teacher"]), "accuracy": tinfo["accuracy"], "latency_ms": lat["teacher"], **tinfo}
    for row in rows:
        row["latency_ms"] = lat[row["dir"]]
    report.add_speed(rows, tm)
    results = {"arch": cfg.model.arch, "data": test.note, "n_train": len(train), "n_test": len(test),
               "seed": cfg.seed, "methods": cfg.prune.methods, "budgets": cfg.prune.budgets,
               "total_steps_per_method": cfg.prune.decay_steps + cfg.prune.finetune_steps,
               "latency_batch": r.latency_batch, "threads": torch.get_num_threads(),
               "machine": f"{cpu_label()}, torch {torch.__version__}",
               "teacher": tm, "runs": rows, "wall_seconds": time.perf_counter() - t0, "config": cfg.to_dict()}
    plots = report.write(results, out)
    return results, plots
