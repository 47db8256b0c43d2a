"""Training loop pieces shared by the teacher and every pruning method: SGD steps over a batch stream, LR schedules,
evaluation, and the teacher checkpoint."""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import maskdecay as md

from .config import Config
from .data import BatchStream, Split, batches, to_float
from .models import build

log = logging.getLogger(__name__)


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def warmup_cosine(total: int, warmup: int = 0) -> Callable[[int], float]:
    """LR multiplier at step ``i``: linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        t = (i - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
             penalty: Callable[[], torch.Tensor] | None = None, before_step: Callable[[], None] | None = None,
             after_step: Callable[[], None] | None = None, amp: bool = False) -> torch.Tensor:
    """One optimizer step on cross-entropy (+ ``penalty()``); the hooks as in :func:`run_steps`; ``amp``: bf16
    autocast on the batch's device. Returns the detached task loss (a tensor: reading it is up to the caller)."""
    with torch.autocast(xb.device.type, torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(xb), yb)
        total = loss + penalty() if penalty is not None else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    if before_step is not None:
        before_step()
    opt.step()
    if after_step is not None:
        after_step()
    return loss.detach()


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, stream: BatchStream, steps: int,
              lr_at: Callable[[int], float], desc: str, penalty: Callable[[], torch.Tensor] | None = None,
              before_step: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None) -> float:
    """``steps`` SGD steps on batches of ``stream``; returns the mean task loss of the last 50 steps.

    Hooks: ``penalty()`` is added to the cross-entropy (mask decay), ``before_step()`` runs between ``backward`` and
    ``opt.step()`` (Torch-Pruning's gradient regularizers), ``after_step()`` after it (``decay.step()``).
    ``lr_at(i)`` scales the base LR each param group had when this call started.
    """
    model.train()
    base = [g["lr"] for g in opt.param_groups]
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 60.0, disable=steps == 0)
    for i in bar:
        xb, yb = next(stream)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_at(i)
        loss = sgd_step(model, opt, xb, yb, penalty, before_step, after_step)
        losses.append(float(loss))
        if i % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}", refresh=False)
    for g, lr in zip(opt.param_groups, base):
        g["lr"] = lr
    tail = losses[-50:]
    return sum(tail) / len(tail) if tail else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 500) -> float:
    """Top-1 test accuracy (%) in eval mode (channels_last inputs, on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for xb, yb in batches(data, batch_size):
        correct += int((model(to_float(xb).to(device)).argmax(1).cpu() == yb).sum())
    return 100.0 * correct / len(data)


def _teacher_key(cfg: Config, n_train: int) -> dict:
    """What the teacher depends on: a checkpoint is reused only when this matches."""
    return {"arch": cfg.model.arch, "seed": cfg.seed, "n_train": n_train, **cfg.teacher.__dict__, "checkpoint": None,
            "device": cfg.device}


def teacher(cfg: Config, train: Split, test: Split) -> tuple[nn.Module, dict]:
    """Train the teacher, or load it from ``teacher.checkpoint`` / ``<out>/teacher.pt`` when the settings match.

    The checkpoint is ``{"key": settings, "state_dict": ..., "accuracy": ...}`` written atomically and read with
    ``weights_only=True``. Returns ``(model, info)``.
    """
    torch.manual_seed(cfg.seed)
    model = build(cfg.model.arch).to(cfg.device, memory_format=torch.channels_last)
    key = _teacher_key(cfg, len(train))
    path = cfg.teacher.checkpoint or str(cfg.out_dir / "teacher.pt")
    try:
        saved = torch.load(path, map_location=cfg.device, weights_only=True)
    except FileNotFoundError:
        saved = None
    if saved is not None:
        if cfg.teacher.checkpoint is None and saved.get("key") != key:
            log.info("teacher: %s was trained with other settings; training a new one", path)
        else:
            model.load_state_dict(saved["state_dict"])
            # a given checkpoint (e.g. the study's teacher) is scored on this config's test images
            acc = saved["accuracy"] if cfg.teacher.checkpoint is None else evaluate(model, test)
            log.info("teacher: loaded %s (%.2f %% test accuracy)", path, acc)
            return model, {"checkpoint": path, "accuracy": acc, "reused": True,
                           "train_seconds": saved.get("train_seconds")}
    elif cfg.teacher.checkpoint is not None:
        raise FileNotFoundError(f"teacher.checkpoint: {path} does not exist")
    t = cfg.teacher
    steps = max(1, round(t.epochs * len(train) / t.batch_size))
    warmup = round(t.warmup_epochs * len(train) / t.batch_size)
    stream = BatchStream(train, t.batch_size, cfg.seed, cfg.device)
    opt = sgd(model, t.lr, t.momentum, t.weight_decay)
    t0 = time.perf_counter()
    loss = run_steps(model, opt, stream, steps, warmup_cosine(steps, min(warmup, steps // 2)), "teacher")
    seconds = time.perf_counter() - t0
    acc = evaluate(model, test)
    log.info("teacher: %d steps (%.1f epochs) in %.0f s, train loss %.3f, test accuracy %.2f %%",
             steps, t.epochs, seconds, loss, acc)
    md.atomic_save({"key": key, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "accuracy": acc, "train_seconds": seconds}, path)
    return model, {"checkpoint": path, "accuracy": acc, "reused": False, "train_seconds": seconds, "steps": steps}
