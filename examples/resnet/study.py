"""``python -m maskdecay_examples.resnet study``: the converged pruning study, resumable at every epoch.

What it runs, in this order (each piece is skipped when its result file exists with the same settings, so the
command can be killed at any time and started again, on another machine too, once the folder is copied):

1. **Teacher**: ``model.arch`` on the training split minus a class-stratified validation split of ``data.val_size``
   images, ``teacher.epochs`` epochs (warm-up + cosine), a checkpoint every epoch, the learning curve (train loss,
   validation and test accuracy per epoch) in ``teacher.json``.
2. For each budget, each method: its **strength sweep** on the validation split (mask-decay penalties,
   Torch-Pruning's GroupNorm ``reg``, and for ``hard`` the fraction of the decay phase its cosine takes, 1 when not
   swept; ``tp_l1`` has none): ``decay_epochs`` of decay (or sparse
   training) and the cut, then ``sweep_finetune_epochs`` of fine-tuning, scored on validation accuracy. When the best
   value sits at an edge of the grid, the grid is extended by one more factor in that direction (up to
   ``sweep_extend`` times). Then the **final run** at the chosen strength: the same decay (the very same steps and
   batches, so its checkpoint is reused), then ``finetune_epochs`` of fine-tuning, scored on the test set.
3. **Seeds**: the ``seed_top`` best methods of the first budget (by final validation accuracy), and the
   ``seed_methods`` (e.g. the two arms of the sparsity-loss ablation), run again with each of ``extra_seeds`` (other
   batches and augmentation from the same teacher). The top methods' seeds can start as soon as the first budget's
   finals are done (a worker with nothing else to do takes them while the other budgets' finals still run). The
   ``seed_methods``' seeds need no ranking: they run with the finals of step 2, and the pieces of the sparsity-loss
   ablation (at ``ablation_budgets``) go first.

Several processes can share one folder: start the same command again (e.g. twice with ``--set threads=1`` on two
cores). Each piece (the teacher, one run) is claimed through a lock file in ``state/`` (:mod:`.claim`); the other
processes skip it, take the next free piece, and come back for the results they need. The results do not depend on
how many processes ran.

The sparsity loss, L1, L2, BN-L1 and group lasso can remove the plan's units (``"plan"``) or choose the units they
remove (``"cut"``: ``md.MaskDecay(select="cut")``, the plan's widths, the units they shrank most; the sparsity loss
then pulls every mask and has no ceiling); with both in ``prune.select`` both are swept and the better one on the
validation split is kept. Hard decay removes the plan's units, chosen on the teacher. The ablation compares the
sparsity loss the plan's way (its ceiling needs the plan's units) with hard decay and the loss without its ceiling:
those runs are marked ``"arm": "plan"`` in ``summary.json`` where the chosen way is another.

Every method gets the same teacher, budget, total steps, batch size, LR schedule (constant ``lr`` while decaying,
then a cosine to 0 over the fine-tuning) and SGD settings. ``tp_l1`` prunes at step 0 and fine-tunes for all the
steps under the same LR schedule.

Layout of ``out/``: ``teacher.pt`` (state_dict + key), ``teacher.json``, ``summary.json``, ``runs/<run>/``
(``cut.pt``: the student right after the cut with its optimizer state, the branch point of the sweep's and the final
fine-tuning; ``result-ft<E>.json``; ``history.json`` for mask decay; ``student.pt`` for final runs), ``state/``
(in-progress checkpoints, deleted when their piece is done). ``cut.pt`` and ``state/`` are working files: the rest is
small enough to keep with the code. ``python -m maskdecay_examples.resnet study-report`` turns the folder into tables and plots.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm

import maskdecay as md

from .. import yaml_config
from ..hostinfo import cpu_label, threads_label
from .claim import claim, gather
from .config import MASK_METHODS, ConfigError
from .data import Split, load_any, resolve
from .methods import TP_FORMAT, example_input, prune_to_macs, rebuild_student, tp_pruner
from .models import build
from .stream import StepStream, carve
from .training import evaluate, sgd, sgd_step, warmup_cosine

log = logging.getLogger(__name__)

STUDY_METHODS: tuple[str, ...] = ("sparsity", "hard", "l1", "l2", "bn_l1", "group_lasso", "tp_l1", "tp_groupnorm",
                                  "sparsity_loss_only")
"""Methods of the study; ``sparsity_loss_only`` is the sparsity loss without its ceiling (the ablation)."""
ABLATION_METHODS: tuple[str, ...] = ("sparsity", "hard", "sparsity_loss_only")
"""The arms of the sparsity-loss ablation: loss + ceiling, ceiling only, loss only."""
NO_STRENGTH: tuple[str, ...] = ("tp_l1",)
"""Methods without a strength; hard decay's "strength" is the fraction of the decay phase its cosine takes
(``md.schedules.within``), 1 by default."""
SELECTING: tuple[str, ...] = ("sparsity", "l1", "l2", "bn_l1", "group_lasso")
"""Penalties that can choose the units they remove at the cut (``prune.select``); the sparsity loss does it on every
unit, without its ceiling (``md.SparsityLoss(scope="all")``)."""
SELECT_MODES: tuple[str, ...] = ("plan", "cut")


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class StudyData:
    """Where the data are; ``val_size`` images are held out of the training set (0: none)."""

    path: str | None = "../shared/data/cifar10"
    train: str | None = None
    test: str | None = None
    val_size: int = 5000
    train_subset: int | None = None
    test_subset: int | None = None
    cache: bool = True


@dataclass
class StudyTeacher:
    """The teacher's schedule: warm-up epochs, then a cosine to 0 at ``epochs``."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1


@dataclass
class StudyPrune:
    """Budgets, methods, schedule, strength grids (``sweep``), seeds of the pruning runs."""

    budgets: list[float] = field(default_factory=lambda: [0.5, 0.3])
    methods: list[str] = field(default_factory=lambda: list(STUDY_METHODS[:-1]))
    ablation_budgets: list[float] = field(default_factory=lambda: [0.5])
    decay_epochs: int = 3
    finetune_epochs: int = 7
    sweep_finetune_epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    importance: str = "l1"
    sweep: dict[str, list[float]] = field(default_factory=dict)
    sweep_budgets: list[float] = field(default_factory=lambda: [0.5, 0.3])
    sweep_extend: int = 2
    seed_top: int = 3
    seed_methods: list[str] = field(default_factory=list)
    extra_seeds: list[int] = field(default_factory=lambda: [1, 2])
    tp_iterative_steps: int = 400
    select: list[str] = field(default_factory=lambda: ["plan"])

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in STUDY_METHODS]
        if bad:
            raise ConfigError(f"methods: unknown method {bad[0]!r}; use any of {', '.join(STUDY_METHODS)}")
        if not self.select or any(m not in SELECT_MODES for m in self.select) or len(set(self.select)) < len(self.select):
            raise ConfigError(f"select: one or both of {', '.join(SELECT_MODES)}, got {self.select}")
        bad = [m for m in self.seed_methods if m not in self.methods]
        if bad:
            raise ConfigError(f"seed_methods: {bad[0]!r} is not one of the methods ({', '.join(self.methods)})")
        for k, grid in self.sweep.items():
            if k not in STUDY_METHODS or k in NO_STRENGTH:
                raise ConfigError(f"sweep: {k!r} is not a method with a strength")
            if len(grid) < 1 or any(v <= 0 for v in grid):
                raise ConfigError(f"sweep.{k}: a list of positive strengths")
            if k == "hard" and any(v > 1 for v in grid):
                raise ConfigError("sweep.hard: fractions of the decay phase, in (0, 1]")
        wanted = [*self.methods, *(["sparsity_loss_only"] if self.ablation_budgets else [])]
        missing = [m for m in wanted if m not in (*NO_STRENGTH, "hard") and m not in self.sweep]
        if missing:
            raise ConfigError(f"sweep: give a grid for {', '.join(missing)}")
        for name in ("budgets", "sweep_budgets", "ablation_budgets"):
            if any(not 0 < b < 1 for b in getattr(self, name)):
                raise ConfigError(f"{name}: MAC fractions strictly between 0 and 1")
        if self.decay_epochs < 1 or self.finetune_epochs < self.sweep_finetune_epochs or self.sweep_finetune_epochs < 1:
            raise ConfigError("decay_epochs >= 1 and finetune_epochs >= sweep_finetune_epochs >= 1")


@dataclass
class StudyConfig:
    """A study: the sections above plus device, precision (``amp``: bf16 autocast), memory format of the pruning
    phases and an optional time budget (``fit_minutes``)."""

    name: str = "study"
    out: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    amp: bool = False
    channels_last: bool = False
    fit_minutes: float | None = None
    arch: str = "resnet20"
    data: StudyData = field(default_factory=StudyData)
    teacher: StudyTeacher = field(default_factory=StudyTeacher)
    prune: StudyPrune = field(default_factory=StudyPrune)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs/resnet") / self.name

    def validate(self) -> None:
        try:
            build(self.arch)
        except ValueError as e:
            raise ConfigError(f"arch: {e}") from None
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device: cpu or cuda[:N], got {self.device!r}")
        if self.fit_minutes is not None and self.fit_minutes <= 0:
            raise ConfigError("fit_minutes: a positive number of minutes (or null)")
        if self.data.val_size == 0:
            if any(len(g) > 1 for g in self.prune.sweep.values()) or self.prune.seed_top > 0:
                raise ConfigError("data.val_size: 0 leaves nothing to choose strengths or methods on: give one "
                                  "strength per method and prune.seed_top: 0")
        elif self.data.val_size < 0:
            raise ConfigError("data.val_size: >= 0")


def load_config(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read and validate a study config (YAML)."""
    return yaml_config.load_config(StudyConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    train: Split
    val: Split | None
    test: Split


def load_data(cfg: StudyConfig) -> Data:
    """Training split minus the validation split, the validation split, the full test split."""
    train_path, test_path = resolve(cfg.data.path, cfg.data.train, cfg.data.test)
    cache = cfg.out_dir / "cache" if cfg.data.cache else None
    full, test = load_any(train_path, cache, "train"), load_any(test_path, cache, "test")
    full, test = full.subset(cfg.data.train_subset, cfg.seed), test.subset(cfg.data.test_subset, cfg.seed)
    if cfg.data.val_size == 0:
        return Data(full, None, test)
    train, val = carve(full, cfg.data.val_size, cfg.seed)
    return Data(train, val, test)


def accuracy(model: nn.Module, split: Split | None) -> float | None:
    """Top-1 accuracy (%) on ``split`` (None without a validation split)."""
    return None if split is None else evaluate(model, split)


# ------------------------------------------------------------------------------------------------------- training
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one name per process: workers may write at once
    tmp.write_text(json.dumps(obj, indent=indent))
    tmp.replace(path)


def compact(obj: Any, digits: int = 6) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (mask histories are kept with the code)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: compact(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compact(v, digits) for v in obj]
    return obj


def _where(device: str) -> str:
    """The device a phase runs on (the GPU's name, or the CPU's with its thread count), for the compute record."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_label()}, {threads_label(torch.get_num_threads())}"


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None


def _bar(total: int, start: int, desc: str) -> tqdm:
    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                mininterval=1.0 if sys.stderr.isatty() else 120.0)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, stream: StepStream, first: int, last: int,
                lr_at: Callable[[int], float], base_lr: float, save: Callable[[int], None], desc: str,
                penalty: Callable[[], torch.Tensor] | None = None, before_step: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None, amp: bool = False) -> list[float]:
    """SGD steps ``first .. last - 1`` on batches ``i`` of ``stream``, ``save(i)`` at every epoch boundary and at
    the end. ``lr_at(i)`` scales ``base_lr``; ``amp``: bf16 autocast. The loss is read back once per epoch, so on a
    GPU the steps queue without waiting for the host. Returns the mean task loss of each finished epoch."""
    model.train()
    spe = stream.steps_per_epoch
    run_loss = torch.zeros((), device=stream.device)
    epoch_losses: list[float] = []
    bar = _bar(last, first, desc)
    for i in range(first, last):
        xb, yb = stream.batch(i)
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_at(i)
        run_loss += sgd_step(model, opt, xb, yb, penalty, before_step, after_step, amp)
        bar.update(1)
        if (i + 1) % spe == 0 or i + 1 == last:
            n = (i % spe) + 1
            epoch_losses.append(float(run_loss) / n)
            run_loss.zero_()
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}", refresh=False)
            save(i + 1)
            model.train()
    bar.close()
    return epoch_losses


def _teacher_key(cfg: StudyConfig) -> dict[str, Any]:
    """What the teacher depends on: its checkpoints are reused only when this matches."""
    d = cfg.data
    extra = {"device": cfg.device, "amp": cfg.amp} if cfg.device != "cpu" or cfg.amp else {}
    return json.loads(json.dumps({"arch": cfg.arch, "seed": cfg.seed, "val_size": d.val_size,
                                  "train_subset": d.train_subset, **cfg.teacher.__dict__, **extra}))


def teacher(cfg: StudyConfig, data: Data) -> nn.Module:
    """Train the teacher (resuming from its last epoch) or load ``teacher.pt``; returns it in eval mode."""
    out = cfg.out_dir
    key = _teacher_key(cfg)
    model = build(cfg.arch).to(cfg.device, memory_format=torch.channels_last)
    done = _load(out / "teacher.pt")
    if done is not None and done.get("key") == key:
        model.load_state_dict(done["state_dict"])
        log.info("teacher: %s (%.2f %% test accuracy)", out / "teacher.pt", done["test_accuracy"])
        return model.eval()
    t = cfg.teacher
    torch.manual_seed(cfg.seed)
    model = build(cfg.arch).to(cfg.device, memory_format=torch.channels_last)
    stream = StepStream(data.train, t.batch_size, cfg.seed, cfg.device, channels_last=True)
    spe = stream.steps_per_epoch
    total, warm = t.epochs * spe, t.warmup_epochs * spe
    opt = sgd(model, t.lr, t.momentum, t.weight_decay)
    state_path = out / "state" / "teacher.pt"
    state = _load(state_path)
    curve: list[dict[str, float]] = []
    start, seconds = 0, 0.0
    if state is not None and state.get("key") == key:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, curve, seconds = state["step"], state["curve"], state["seconds"]
        log.info("teacher: resuming at epoch %d of %d", start // spe, t.epochs)
    t0 = time.perf_counter() - seconds
    lr_at = warmup_cosine(total, warm)
    for e in range(start // spe, t.epochs):
        loss = train_steps(model, opt, stream, e * spe, (e + 1) * spe, lr_at, t.lr, lambda step: None,
                           f"teacher {e + 1}/{t.epochs}", amp=cfg.amp)[-1]
        val, test = accuracy(model, data.val), evaluate(model, data.test)
        curve.append({"epoch": e + 1, "train_loss": loss, "val_accuracy": val, "test_accuracy": test,
                      "seconds": time.perf_counter() - t0})
        log.info("teacher epoch %d/%d: loss %.3f, validation %s %%, test %.2f %%", e + 1, t.epochs, loss, val, test)
        md.atomic_save({"key": key, "step": (e + 1) * spe, "model": model.state_dict(), "opt": opt.state_dict(),
                        "curve": curve, "seconds": time.perf_counter() - t0}, state_path)
    seconds = time.perf_counter() - t0
    md.atomic_save({"key": key, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "test_accuracy": curve[-1]["test_accuracy"], "val_accuracy": curve[-1]["val_accuracy"]},
                   out / "teacher.pt")
    _write_json(out / "teacher.json", {"key": key, "curve": curve, "train_seconds": seconds, "data": data.test.note,
                                       "n_train": len(data.train), "n_val": len(data.val or ()), "n_test": len(data.test),
                                       "machine": cpu_label(), "threads": torch.get_num_threads()})
    state_path.unlink(missing_ok=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ one run
@dataclass(frozen=True)
class Run:
    """One pruning run: method, budget, strength (None for methods without one), seed, and which units go
    (``"plan"``: the plan's; ``"cut"``: those the penalty shrank most, see ``md.MaskDecay(select=...)``)."""

    method: str
    budget: float
    strength: float | None
    seed: int
    select: str = "plan"

    @property
    def name(self) -> str:
        s = "" if self.strength is None else f"-s{self.strength:g}"
        cut = "-cut" if self.select == "cut" else ""
        return f"{self.method}-{self.budget:g}{s}{cut}-seed{self.seed}"


class _NotFinished(Exception):
    """A piece has no result yet (raised while :meth:`Study.finished` looks)."""


class Study:
    """The pieces of the study over one output folder; every method reads and writes ``out/``."""

    def __init__(self, cfg: StudyConfig, data: Data, tmodel: nn.Module) -> None:
        self.cfg, self.data = cfg, data
        self.p = cfg.prune
        self.teacher = copy.deepcopy(tmodel).cpu().to(memory_format=torch.contiguous_format)
        self.out = cfg.out_dir
        self.spe = len(data.train) // self.p.batch_size
        self.decay_steps = self.p.decay_epochs * self.spe
        self.teacher_macs = md.count_macs(self.teacher, example_input())
        # NCHW by default: on torch 2.13's CPU backend, training a pruned ResNet with 2-channel layers in
        # channels_last crashed; GPUs train channels_last (config channels_last: true)
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self._finished_only = False  # see finished()

    # --------------------------------------------------------------- helpers
    def _dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def _state(self, run: Run, phase: str) -> Path:
        return self.out / "state" / f"{run.name}-{phase}.pt"

    def _key(self, run: Run) -> dict[str, Any]:
        p = self.p
        return json.loads(json.dumps({
            "run": {k: v for k, v in run.__dict__.items() if k != "select"}, "arch": self.cfg.arch,
            "teacher": _teacher_key(self.cfg),
            "decay_epochs": p.decay_epochs, "batch_size": p.batch_size, "lr": p.lr, "momentum": p.momentum,
            "weight_decay": p.weight_decay, "importance": p.importance, "val_size": self.cfg.data.val_size,
            **({"channels_last": True} if self.cfg.channels_last else {}),
            **({"select": "cut"} if run.select == "cut" else {})}))

    def _masked(self, run: Run) -> tuple[nn.Module, md.ChannelMasks, md.Plan, md.MaskDecay]:
        model = copy.deepcopy(self.teacher).to(self.cfg.device, memory_format=self.fmt)
        masks = md.ChannelMasks(model, example_input(self.cfg.device), ignored_layers=[model.fc])
        plan = md.plan(masks, macs=run.budget, importance=self.p.importance)
        schedule = md.schedules.within(run.strength) if run.method == "hard" and run.strength else "cosine"
        decay = md.MaskDecay(masks, plan, steps=self.decay_steps, schedule=schedule, regularizer=regularizer(run),
                             select=run.select)
        return model, masks, plan, decay

    def _opt(self, model: nn.Module) -> torch.optim.SGD:
        return sgd(model, self.p.lr, self.p.momentum, self.p.weight_decay)

    def _stream(self, run: Run) -> StepStream:
        return StepStream(self.data.train, self.p.batch_size, 1000 + run.seed, self.cfg.device,
                          channels_last=self.cfg.channels_last)

    # --------------------------------------------------------------- phase 1: decay (or sparse training) and cut
    def cut(self, run: Run) -> Path:
        """Run the decay phase of ``run`` (resumable) and save the student right after the cut: ``cut.pt``."""
        path = self._dir(run) / "cut.pt"
        key = self._key(run)
        saved = _load(path)
        if saved is not None and saved.get("key") == key:
            return path
        t0 = time.perf_counter()
        stream = self._stream(run)
        state_path = self._state(run, "decay")
        state = _load(state_path)
        if state is not None and state.get("key") != key:
            state = None
        info: dict[str, Any] = {}
        before = (state or {}).get("seconds", 0.0)

        def elapsed() -> float:
            return before + time.perf_counter() - t0

        if run.method in MASK_METHODS or run.method == "sparsity_loss_only":
            model, masks, plan, decay = self._masked(run)
            opt = self._opt(model)
            start = 0
            if state is not None:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])
                decay.load_state_dict(state["decay"])
                start = state["step"]

            def save(step: int) -> None:
                md.atomic_save({"key": key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                "decay": decay.state_dict(), "seconds": elapsed()}, state_path)

            train_steps(model, opt, stream, start, self.decay_steps, lambda i: 1.0, self.p.lr, save,
                        f"{run.name} decay", penalty=decay.penalty, after_step=decay.step, amp=self.cfg.amp)
            student = md.export(model, masks, optimizer=opt)
            plan = decay.plan  # with select="cut", the units the penalty chose
            _write_json(self._dir(run) / "history.json", compact(decay.history), indent=None)
            info["cut_jump"] = decay.history.get("cut_jump") or 0.0
            payload = {"format": md.checkpoint.FORMAT, "version": md.checkpoint.VERSION, "plan": plan.to_dict(),
                       "state_dict": student.state_dict(), "config": {"arch": self.cfg.arch}}
            opt_state = opt.state_dict()
        else:
            model = copy.deepcopy(self.teacher).to(self.cfg.device, memory_format=self.fmt)
            pruner = tp_pruner(run.method, model, self.p.tp_iterative_steps, run.strength, self.cfg.device)
            if run.method == "tp_groupnorm":
                opt = self._opt(model)
                start = 0
                if state is not None:
                    model.load_state_dict(state["model"])
                    opt.load_state_dict(state["opt"])
                    start = state["step"]

                def save(step: int) -> None:
                    md.atomic_save({"key": key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                    "seconds": elapsed()}, state_path)

                train_steps(model, opt, stream, start, self.decay_steps, lambda i: 1.0, self.p.lr, save,
                            f"{run.name} sparse", before_step=lambda: pruner.regularize(model), amp=self.cfg.amp)
            prune_to_macs(pruner, model, run.budget * self.teacher_macs, example_input(self.cfg.device))
            history = [[n, bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
            payload = {"format": TP_FORMAT, "arch": self.cfg.arch, "tp_history": history,
                       "state_dict": model.state_dict()}
            opt_state = None  # Torch-Pruning replaces the parameters: the fine-tuning starts a new optimizer
            student = model
        info["accuracy_after_cut_val"] = accuracy(student, self.data.val)
        info["decay_seconds"] = elapsed()
        info["decay_machine"] = _where(self.cfg.device)
        md.atomic_save({**payload, "key": key, "opt": opt_state, "info": info}, path)
        state_path.unlink(missing_ok=True)
        return path

    def load_cut(self, run: Run) -> tuple[nn.Module, dict | None, dict]:
        """The student of ``cut.pt`` (on the study device, NCHW), the optimizer state after the cut, the cut info."""
        model, ckpt = load_cut(self._dir(run) / "cut.pt", self.cfg.arch)
        return model.to(self.cfg.device, memory_format=self.fmt), ckpt["opt"], ckpt["info"]

    # --------------------------------------------------------------- phase 2: fine-tune
    def finetune(self, run: Run, epochs: int, final: bool) -> dict[str, Any]:
        """Fine-tune the cut student for ``epochs`` (resumable); validation accuracy, and test accuracy if ``final``.

        ``tp_l1`` cuts at step 0, so its fine-tuning covers the decay steps as well (same total steps and schedule).
        """
        path = self._dir(run) / f"result-ft{epochs}.json"
        key = {**self._key(run), "finetune_epochs": epochs, "final": final}
        saved = _read_json(path)
        if saved is not None and saved.get("key") == key:
            return saved
        if self._finished_only:
            raise _NotFinished(run.name)
        with claim(self.out / "state" / f"{run.name}.lock"):
            saved = _read_json(path)  # another worker may have finished it since the first look
            if saved is not None and saved.get("key") == key:
                return saved
            return self._finetune(run, epochs, final, path, key)

    def _finetune(self, run: Run, epochs: int, final: bool, path: Path, key: dict[str, Any]) -> dict[str, Any]:
        self.cut(run)
        t0 = time.perf_counter()
        model, opt_state, info = self.load_cut(run)
        opt = self._opt(model)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        ft = epochs * self.spe
        d = self.decay_steps
        if run.method == "tp_l1":
            first_ft, last = 0, d + ft
            lr_at: Callable[[int], float] = lambda i: 1.0 if i < d else warmup_cosine(ft)(i - d)  # noqa: E731
        else:
            first_ft, last = d, d + ft
            lr_at = lambda i: warmup_cosine(ft)(i - d)  # noqa: E731
        state_path = self._state(run, f"ft{epochs}")
        state = _load(state_path)
        start, seconds = first_ft, 0.0
        if state is not None and state.get("key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, seconds = state["step"], state["seconds"]

        def save(step: int) -> None:
            md.atomic_save({"key": key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                            "seconds": seconds + time.perf_counter() - t0}, state_path)

        train_steps(model, opt, self._stream(run), start, last, lr_at, self.p.lr, save, f"{run.name} ft{epochs}",
                    amp=self.cfg.amp)
        prof = md.profile(model.cpu().eval(), example_input(), warmup=0, runs=1)
        model.to(self.cfg.device)
        result = {"key": key, "run": run.name, **run.__dict__, "finetune_epochs": epochs,
                  "total_steps": d + ft, "macs": prof.macs, "params": prof.params,
                  "val_accuracy": accuracy(model, self.data.val), **info,
                  "finetune_seconds": seconds + time.perf_counter() - t0, "machine": _where(self.cfg.device)}
        if final:
            result["test_accuracy"] = evaluate(model, self.data.test)
            cut = _load(self._dir(run) / "cut.pt")
            shape = {k: cut[k] for k in ("format", "version", "plan", "config", "arch", "tp_history") if k in cut}
            md.atomic_save({**shape, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}},
                           self._dir(run) / "student.pt")
        _write_json(path, result)
        state_path.unlink(missing_ok=True)
        log.info("%s ft%d: validation %s %%%s, %.2f M MACs", run.name, epochs, result["val_accuracy"],
                 f", test {result['test_accuracy']:.2f} %" if final else "", result["macs"] / 1e6)
        return result

    # --------------------------------------------------------------- sweeps and finals
    def sweep(self, method: str, budget: float, seed: int, select: str | None = None
              ) -> tuple[Run, list[dict[str, Any]]]:
        """Sweep ``method``'s strength at ``budget`` (for a penalty that can choose its units, in every mode of
        ``prune.select``, or in ``select`` alone); returns the chosen run (seed ``seed``) and the sweep points."""
        if method in NO_STRENGTH:
            return Run(method, budget, None, seed), []
        start = sorted(self.p.sweep.get(method, [1.0]))  # hard decay: over the whole phase unless swept
        modes = [select] if select else list(self.p.select) if method in SELECTING else ["plan"]
        if len(start) == 1 and len(modes) == 1:  # nothing to choose
            return Run(method, budget, start[0], seed, modes[0]), []
        factor = start[-1] / start[-2] if len(start) > 1 else 10.0
        grids = {mode: list(start) for mode in modes}
        extended = {mode: 0 for mode in modes}
        results: dict[tuple[str, float], dict[str, Any]] = {}
        while True:
            results.update(gather({(mode, s): partial(self.finetune, Run(method, budget, s, seed, mode),
                                                      self.p.sweep_finetune_epochs, False)
                                   for mode, grid in grids.items() for s in grid if (mode, s) not in results},
                                  wait=False))
            grown = False
            for mode, grid in grids.items():
                acc = [results[(mode, s)]["val_accuracy"] for s in grid]
                best = grid[acc.index(max(acc))]  # the smallest of tied strengths
                low, high = len(grid) > 1 and acc[0] > acc[1], len(grid) > 1 and acc[-1] > acc[-2]
                if extended[mode] >= self.p.sweep_extend or not ((best == grid[0] and low) or
                                                                 (best == grid[-1] and high)):
                    continue
                if method == "hard" and best == grid[-1]:  # a decay cannot take more than the whole phase
                    continue
                grid[:] = [grid[0] / factor, *grid] if best == grid[0] else [*grid, grid[-1] * factor]
                grid[:] = [float(f"{s:.6g}") for s in grid]
                extended[mode] += 1
                grown = True
            if not grown:
                break
        points = [results[(mode, s)] for mode, grid in grids.items() for s in grid]
        best = max(points, key=lambda r: r["val_accuracy"])  # the first of tied points: "plan", smaller strengths
        return Run(method, budget, best["strength"], seed, best.get("select", "plan")), points

    def chosen(self, method: str, budget: float, seed: int, select: str | None = None
               ) -> tuple[Run, list[dict[str, Any]]]:
        """The run of ``method`` at ``budget`` with seed ``seed``: strength (and mode, unless ``select`` fixes it)
        from its own sweep, or from the sweep of the first swept budget."""
        swept = budget in self.p.sweep_budgets or not self.p.sweep_budgets
        pick, points = self.sweep(method, budget if swept else self.p.sweep_budgets[0], self.cfg.seed, select)
        return Run(method, budget, pick.strength, seed, pick.select), points

    def final(self, method: str, budget: float, seed: int, select: str | None = None) -> dict[str, Any]:
        """The fully fine-tuned run of ``method`` at its chosen strength (in mode ``select`` if given: an ablation
        arm, marked ``"arm"`` in the result)."""
        run, points = self.chosen(method, budget, seed, select)
        result = self.finetune(run, self.p.finetune_epochs, True)
        return {**result, **({"arm": select} if select else {}),
                "sweep": [{"strength": r["strength"], "select": r.get("select", "plan"),
                           "val_accuracy": r["val_accuracy"]} for r in points]}

    def finished(self, jobs: dict[Any, Callable[[], dict[str, Any]]]) -> dict[Any, dict[str, Any]]:
        """The results of the ``jobs`` whose pieces are all finished, read without running anything."""
        self._finished_only = True
        try:
            results = {}
            for key, job in jobs.items():
                try:
                    results[key] = job()
                except _NotFinished:
                    pass
            return results
        finally:
            self._finished_only = False

    def _arm(self, method: str) -> str | None:
        """``"plan"`` for an ablation method that could also choose its own units (its ablation arm is the plan's
        way), else None."""
        ablation = method in ABLATION_METHODS
        return "plan" if ablation and method in SELECTING and set(self.p.select) != {"plan"} else None

    def all(self) -> dict[str, Any]:
        """Every piece, in the order of the module docstring; returns the finals (``summary.json``).

        Pieces that another process holds (see :mod:`.claim`) are skipped and come back later, so several processes
        started on the same folder share the work; each returns once every piece is done."""
        seed, first = self.cfg.seed, self.p.budgets[0]
        jobs: dict[Any, Callable[[], dict[str, Any]]] = {}
        for budget in self.p.budgets:
            methods = list(self.p.methods)
            if budget in self.p.ablation_budgets and "sparsity_loss_only" not in methods:
                methods.append("sparsity_loss_only")
            for method in methods:
                jobs[(method, budget, seed)] = partial(self.final, method, budget, seed)
                if budget in self.p.ablation_budgets and (arm := self._arm(method)):
                    jobs[(method, budget, seed, "arm")] = partial(self.final, method, budget, seed, arm)
        for s in self.p.extra_seeds:  # the seed_methods' seeds need no ranking: they run with the finals
            for m in self.p.seed_methods:
                arm = self._arm(m) if first in self.p.ablation_budgets else None
                jobs[(m, first, s, *(["arm"] if arm else []))] = partial(self.final, m, first, s, arm)
        # the ablation's pieces first, so that its question is answered before the rest of the table
        order = sorted(jobs, key=lambda k: not (k[0] in ABLATION_METHODS and k[1] in self.p.ablation_budgets))
        jobs = {k: jobs[k] for k in order}

        def seeds(results: dict[Any, dict[str, Any]]) -> dict[Any, Callable[[], dict[str, Any]]]:
            """The top methods' extra seeds, as soon as every final of the first budget is done (the other budgets
            need not be: a worker with nothing else to do starts the seeds)."""
            ranking = [results.get((m, first, seed)) for m in self.p.methods]
            if not self.p.seed_top or not self.p.extra_seeds or None in ranking:
                return {}
            top = [f["method"] for f in sorted(ranking, key=lambda f: -f["val_accuracy"])[:self.p.seed_top]]
            return {(m, first, s): partial(self.final, m, first, s) for m in top for s in self.p.extra_seeds}

        def done(results: dict[Any, dict[str, Any]]) -> None:
            """summary.json lists every piece finished on disk, by any worker, from the start."""
            self.write_summary(list(self.finished({**jobs, **seeds(results)}).values()))

        done({})
        return self.write_summary(list(gather(jobs, wait=True, on_done=done, more=seeds).values()))

    def write_summary(self, finals: list[dict[str, Any]]) -> dict[str, Any]:
        summary = {"arch": self.cfg.arch, "data": self.data.test.note, "teacher_macs": self.teacher_macs,
                   "config": json.loads(json.dumps(self.cfg, default=lambda o: o.__dict__)),
                   "finals": [{k: v for k, v in f.items() if k != "key"} for f in finals]}
        _write_json(self.out / "summary.json", summary)
        return summary


def load_cut(path: Path, arch: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student saved in a run's ``cut.pt`` or ``student.pt`` (on the CPU); returns ``(model, checkpoint)``."""
    return rebuild_student(path, arch)


def load_student(run_dir: Path, arch: str) -> nn.Module:
    """The fine-tuned student of a final run folder (``student.pt``: its weights and how it was cut), in eval mode."""
    return load_cut(run_dir / "student.pt", arch)[0].eval()


def regularizer(run: Run) -> md.Regularizer | str:
    """The maskdecay regularizer of a mask-decay run at its strength."""
    if run.method == "hard":
        return "hard"
    if run.method == "sparsity_loss_only":
        return md.SparsityLoss(strength=run.strength, ceiling=False)
    if run.method == "sparsity" and run.select == "cut":
        return md.SparsityLoss(strength=run.strength, scope="all")
    classes = {"sparsity": md.SparsityLoss, "l1": md.L1, "l2": md.L2, "bn_l1": md.BNScaleL1,
               "group_lasso": md.GroupLasso}
    return classes[run.method](strength=run.strength)


def _seconds_per_step(model: nn.Module, stream: StepStream, amp: bool, n: int = 30, **hooks: Any) -> float:
    """Measured seconds per training step (after 10 warm-up steps; the device is synchronised around the timing)."""
    opt = sgd(model, 0.01, 0.9, 5e-4)
    sync = torch.cuda.synchronize if stream.device.type == "cuda" else (lambda: None)
    none: Callable[[int], None] = lambda step: None  # noqa: E731
    train_steps(model, opt, stream, 0, 10, lambda i: 1.0, 0.01, none, "probe", amp=amp, **hooks)
    sync()
    t0 = time.perf_counter()
    train_steps(model, opt, stream, 10, 10 + n, lambda i: 1.0, 0.01, none, "probe", amp=amp, **hooks)
    sync()
    return (time.perf_counter() - t0) / n


def fit_schedule(cfg: StudyConfig, data: Data) -> dict[str, Any]:
    """Size the pruning epochs so that the whole study fits ``cfg.fit_minutes``, from step times measured here.

    Probes the teacher, a masked model under decay and an exported student at the first budget; keeps the teacher's
    epochs and the config's decay : fine-tune ratio, and gives each final run the same epochs. The plan is written
    to ``plan.json`` and reused, so a resumed study keeps its schedule. Sets ``cfg.prune.decay_epochs`` and
    ``finetune_epochs``; raises ``ValueError`` when the teacher alone does not fit.
    """
    path = cfg.out_dir / "plan.json"
    plan = _read_json(path)
    if plan is None:
        p, dev = cfg.prune, cfg.device
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        probe = StepStream(data.train, p.batch_size, 0, dev, channels_last=cfg.channels_last)
        t_teacher = _seconds_per_step(build(cfg.arch).to(dev, memory_format=torch.channels_last),
                                      StepStream(data.train, cfg.teacher.batch_size, 0, dev, channels_last=True),
                                      cfg.amp)
        model = build(cfg.arch).to(dev, memory_format=fmt)
        masks = md.ChannelMasks(model, example_input(dev), ignored_layers=[model.fc])
        decay = md.MaskDecay(masks, md.plan(masks, macs=p.budgets[0]), steps=1000, regularizer="sparsity")
        t_decay = _seconds_per_step(model, probe, cfg.amp, penalty=decay.penalty, after_step=decay.step)
        masks = md.ChannelMasks(model := build(cfg.arch).to(dev, memory_format=fmt), example_input(dev),
                                ignored_layers=[model.fc])
        hard = md.MaskDecay(masks, md.plan(masks, macs=p.budgets[0]), steps=1, regularizer="hard")
        hard.step()
        t_student = _seconds_per_step(md.export(model, masks).to(memory_format=fmt), probe, cfg.amp)
        t0 = time.perf_counter()
        evaluate(model, data.test)
        t_eval = (time.perf_counter() - t0) * (len(data.test) + len(data.val or ())) / len(data.test)
        spe_t = len(data.train) // cfg.teacher.batch_size
        spe = len(data.train) // p.batch_size
        teacher_s = cfg.teacher.epochs * (spe_t * t_teacher + t_eval)
        methods = [m for b in p.budgets for m in p.methods] + \
            ["sparsity_loss_only" for b in p.ablation_budgets if "sparsity_loss_only" not in p.methods]
        per_unit = sum(spe * (p.decay_epochs * (t_student if m == "tp_l1" else t_decay)
                              + p.finetune_epochs * t_student) for m in methods)
        left = cfg.fit_minutes * 60 - teacher_s - len(methods) * 3 * t_eval
        if left <= per_unit / max(p.decay_epochs, p.finetune_epochs):
            raise ValueError(
                f"fit_minutes: {cfg.fit_minutes:g} minutes leave {max(left, 0.0) / 60:.2f} after the teacher "
                f"({teacher_s / 60:.2f} min at {t_teacher * 1e3:.1f} ms per step) and the evaluations, less than one "
                f"epoch of each of the {len(methods)} pruning runs needs: lower teacher.epochs or raise fit_minutes")
        k = left / per_unit
        plan = {"seconds_per_step": {"teacher": t_teacher, "decay": t_decay, "student": t_student},
                "eval_seconds": t_eval, "teacher_minutes": teacher_s / 60,
                "decay_epochs": max(1, int(k * p.decay_epochs)), "finetune_epochs": max(1, int(k * p.finetune_epochs)),
                "fit_minutes": cfg.fit_minutes, "device": torch.cuda.get_device_name() if dev.startswith("cuda")
                else cpu_label()}
        _write_json(path, plan)
        log.info("schedule for %g minutes: teacher %d epochs (%.1f min), %d runs of %d + %d epochs "
                 "(%.2f / %.2f / %.2f ms per teacher / decay / student step)", cfg.fit_minutes, cfg.teacher.epochs,
                 teacher_s / 60, len(methods), plan["decay_epochs"], plan["finetune_epochs"], t_teacher * 1e3,
                 t_decay * 1e3, t_student * 1e3)
    cfg.prune.decay_epochs, cfg.prune.finetune_epochs = plan["decay_epochs"], plan["finetune_epochs"]
    cfg.prune.sweep_finetune_epochs = min(cfg.prune.sweep_finetune_epochs, plan["finetune_epochs"])
    return plan


def run(cfg: StudyConfig, stage: str = "all") -> dict[str, Any] | None:
    """The study of ``cfg`` up to ``stage`` (``teacher`` or ``all``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    log.info("data: %d train, %d validation, %d test images (%s); %s, %s", len(data.train), len(data.val or ()),
             len(data.test), data.test.note, cpu_label(), threads_label(torch.get_num_threads()))
    if cfg.fit_minutes is not None:
        fit_schedule(cfg, data)
    with claim(cfg.out_dir / "state" / "teacher.lock", wait=True):  # other workers wait for it, then load it
        tmodel = teacher(cfg, data)
    if stage == "teacher":
        return None
    return Study(cfg, data, tmodel).all()
