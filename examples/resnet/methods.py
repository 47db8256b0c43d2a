"""The pruning methods compared by the example, each run from the same teacher with the same budget, batches, seed,
LR schedule and total number of steps (``decay_steps + finetune_steps``):

* mask decay (``maskdecay``) with each regularizer: ``decay_steps`` steps of decay, export, ``finetune_steps`` steps;
* ``tp_l1``: Torch-Pruning's ``MagnitudePruner`` with group-L1 importance, pruned one-shot (global ranking) to the
  budget at step 0, then fine-tuned for all the steps;
* ``tp_groupnorm``: Torch-Pruning's ``GroupNormPruner`` (DepGraph group sparsity, ``regularize`` on every step) for
  ``decay_steps`` steps, pruned to the budget, then ``finetune_steps`` steps of fine-tuning.

The LR is ``prune.lr`` (constant) for the first ``decay_steps`` steps and follows a cosine to 0 over the rest. Torch-
Pruning replaces the parameters when it prunes, so its optimizer is rebuilt there (momentum lost; a TP limit); mask
decay's export carries the optimizer state over.

These pruning phases train in the default NCHW memory format (the teacher trains channels_last): training a pruned
ResNet-20 with 2-channel layers in channels_last crashed torch 2.13's CPU backend ("double free or corruption" with one
thread, a hang in oneDNN's 1x1-conv weight gradient with two), reproducibly; NCHW trains it fine. Evaluation and
latency use channels_last inputs (forward passes only).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

import maskdecay as md

from .config import MASK_METHODS, Config
from .data import BatchStream, Split, to_float
from .models import build
from .training import evaluate, run_steps, sgd, warmup_cosine

log = logging.getLogger(__name__)

TP_FORMAT = "resnet-example-tp-student"
TRAIN_FORMAT = torch.contiguous_format
"""Memory format of the pruning phases (see the module docstring)."""


def example_input(device: str | torch.device = "cpu") -> torch.Tensor:
    """One CIFAR image's shape, the tracing input of every method."""
    return torch.randn(1, 3, 32, 32, device=device)


@dataclass
class Outcome:
    """A pruned, fine-tuned student and what was measured on the way."""

    method: str
    budget: float
    student: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] | None = None
    plan: md.Plan | None = None


def regularizer(method: str, cfg: Config) -> Any:
    """The maskdecay regularizer of a mask-decay method (library default strength unless ``prune.strengths``)."""
    name = MASK_METHODS[method]
    if method not in cfg.prune.strengths:
        return name
    classes = {"sparsity": md.SparsityLoss, "l1": md.L1, "l2": md.L2, "bn": md.BNScaleL1, "group_lasso": md.GroupLasso}
    return classes[name](strength=cfg.prune.strengths[method])


def _constant(i: int) -> float:
    return 1.0


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def mask_decay(method: str, budget: float, teacher: nn.Module, cfg: Config, stream: BatchStream,
               test: Split) -> Outcome:
    """Decay a copy of the teacher to ``budget`` of its MACs, export it, fine-tune it."""
    p = cfg.prune
    model = copy.deepcopy(teacher).to(memory_format=TRAIN_FORMAT)
    masks = md.ChannelMasks(model, example_input(cfg.device), ignored_layers=[model.fc])
    plan = md.plan(masks, macs=budget, importance=p.importance)
    decay = md.MaskDecay(masks, plan, steps=p.decay_steps, schedule=p.schedule, regularizer=regularizer(method, cfg))
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    run_steps(model, opt, stream, p.decay_steps, _constant, f"{method}@{budget:g} decay",
              penalty=decay.penalty, after_step=decay.step)
    probe = to_float(test.x[:200]).to(cfg.device)
    masked = _outputs(model, probe)
    student = md.export(model, masks, optimizer=opt).to(memory_format=TRAIN_FORMAT)
    diff = float((_outputs(student, probe) - masked).abs().max() / masked.abs().max())
    acc_export = evaluate(student, test)
    run_steps(student, opt, stream, p.finetune_steps, warmup_cosine(p.finetune_steps), f"{method}@{budget:g} tune")
    info = {"plan_ratio": plan.ratio, "widths": plan.widths, "cut_jump": decay.history.get("cut_jump") or 0.0,
            "export_rel_diff": diff, "accuracy_after_export": acc_export}
    return Outcome(method, budget, student, info, decay.history, plan)


def prune_to_macs(pruner: tp.pruner.BasePruner, model: nn.Module, target: float, x: torch.Tensor) -> int:
    """Call ``pruner.step()`` until our MAC count is at most ``target`` (TP has no MAC target of its own)."""
    steps = 0
    while md.count_macs(model, x) > target:
        if pruner.current_step >= pruner.iterative_steps:
            raise ValueError(f"Torch-Pruning could not reach {target / 1e6:.2f} M MACs within {steps} steps "
                             f"(max_pruning_ratio 0.9); raise prune.tp_iterative_steps or the budget")
        pruner.step()
        steps += 1
    return steps


def tp_pruner(method: str, model: nn.Module, iterative_steps: int, reg: float | None,
              device: str | torch.device = "cpu") -> tp.pruner.BasePruner:
    """Torch-Pruning's pruner of a baseline: ``tp_l1`` (MagnitudePruner, group L1) or ``tp_groupnorm``
    (GroupNormPruner with ``reg``), global ranking, classifier ignored."""
    common = dict(global_pruning=True, pruning_ratio=1.0, max_pruning_ratio=0.9, iterative_steps=iterative_steps,
                  ignored_layers=[model.fc])
    x = example_input(device)
    if method == "tp_l1":
        return tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **common)
    return tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg,
                                     **common)


def torch_pruning(method: str, budget: float, teacher: nn.Module, cfg: Config, stream: BatchStream,
                  test: Split) -> Outcome:
    """A Torch-Pruning baseline (``tp_l1`` or ``tp_groupnorm``) through TP's own pruners."""
    p = cfg.prune
    model = copy.deepcopy(teacher).to(memory_format=TRAIN_FORMAT)
    x = example_input(cfg.device)
    target = budget * md.count_macs(teacher, x)
    pruner = tp_pruner(method, model, p.tp_iterative_steps, p.tp_groupnorm_reg, cfg.device)
    tune_steps = p.decay_steps + p.finetune_steps
    lr_at = lambda i: _constant(i) if i < p.decay_steps else warmup_cosine(p.finetune_steps)(i - p.decay_steps)  # noqa: E731
    if method == "tp_groupnorm":
        opt = sgd(model, p.lr, p.momentum, p.weight_decay)
        run_steps(model, opt, stream, p.decay_steps, _constant, f"{method}@{budget:g} sparse",
                  before_step=lambda: pruner.regularize(model))
        tune_steps = p.finetune_steps
        lr_at = warmup_cosine(p.finetune_steps)
    n = prune_to_macs(pruner, model, target, x)
    model = model.to(memory_format=TRAIN_FORMAT)
    acc_pruned = evaluate(model, test)
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)  # TP replaced the parameters: a new optimizer
    run_steps(model, opt, stream, tune_steps, lr_at, f"{method}@{budget:g} tune")
    history = [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in pruner.pruning_history()]
    return Outcome(method, budget, model, {"tp_steps": n, "accuracy_after_export": acc_pruned, "tp_history": history})


def run(method: str, budget: float, teacher: nn.Module, cfg: Config, train: Split, test: Split) -> Outcome:
    """One method at one budget; every method gets the same batch stream (seed ``cfg.seed + 1``)."""
    stream = BatchStream(train, cfg.prune.batch_size, cfg.seed + 1, cfg.device,
                         channels_last=TRAIN_FORMAT == torch.channels_last)
    torch.manual_seed(cfg.seed + 1)
    t0 = time.perf_counter()
    fn = mask_decay if method in MASK_METHODS else torch_pruning
    out = fn(method, budget, teacher, cfg, stream, test)
    out.info["seconds"] = time.perf_counter() - t0
    out.info["accuracy"] = evaluate(out.student, test)
    return out


def save_student(out: Outcome, path: Path, arch: str) -> None:
    """Checkpoint the student: maskdecay's ``save_pruned`` (state_dict + plan), or for Torch-Pruning students the
    state_dict + TP's pruning history (replayed by :func:`load_student`). No pickled modules either way."""
    if out.method in MASK_METHODS:
        md.save_pruned(path, out.student, out.plan, config={"arch": arch, "method": out.method})
    else:
        md.atomic_save({"format": TP_FORMAT, "arch": arch, "tp_history": out.info["tp_history"],
                        "state_dict": out.student.state_dict()}, path)


def rebuild_student(path: Path, arch: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved student on the CPU: ``maskdecay.load_pruned`` for mask decay, Torch-Pruning's history replayed
    on a fresh model for its pruners. Returns ``(model, checkpoint)``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") == TP_FORMAT:
        model = build(ckpt["arch"])
        dg = tp.DependencyGraph().build_dependency(model, example_input())
        dg.load_pruning_history([(n, o, list(i)) for n, o, i in ckpt["tp_history"]])
        model.load_state_dict(ckpt["state_dict"], strict=True)
    else:
        model = md.load_pruned(path, lambda: build(arch), example_input())
    return model, ckpt


def load_student(path: Path, arch: str) -> nn.Module:
    """Rebuild a student written by :func:`save_student`, channels_last, in eval mode."""
    return rebuild_student(path, arch)[0].to(memory_format=torch.channels_last).eval()
