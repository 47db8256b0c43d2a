"""``python -m resnet study``: the converged pruning study, resumable at every epoch.

What it runs, in this order (each piece is skipped when its result file exists with the same settings, so the
command can be killed at any time and started again, on another machine too, once the folder is copied):

1. **Teacher**: ``model.arch`` on the training split minus a class-stratified validation split of ``data.val_size``
   images, ``teacher.epochs`` epochs (warm-up + cosine), a checkpoint every epoch, the learning curve (train loss,
   validation and test accuracy per epoch) in ``teacher.json``.
2. For each budget, each method: its **strength sweep** on the validation split (mask-decay penalties and
   Torch-Pruning's GroupNorm ``reg``; ``hard`` and ``tp_l1`` have none): ``decay_epochs`` of decay (or sparse
   training) and the cut, then ``sweep_finetune_epochs`` of fine-tuning, scored on validation accuracy. When the best
   value sits at an edge of the grid, the grid is extended by one more factor in that direction (up to
   ``sweep_extend`` times). Then the **final run** at the chosen strength: the same decay (the very same steps and
   batches, so its checkpoint is reused), then ``finetune_epochs`` of fine-tuning, scored on the test set.
3. **Seeds**: the ``seed_top`` best methods of the first budget (by final validation accuracy) run again with each of
   ``extra_seeds`` (other batches and augmentation from the same teacher).

Every method gets the same teacher, budget, total steps, batch size, LR schedule (constant ``lr`` while decaying,
then a cosine to 0 over the fine-tuning) and SGD settings. ``tp_l1`` prunes at step 0 and fine-tunes for all the
steps under the same LR schedule.

Layout of ``out/``: ``teacher.pt`` (state_dict + key), ``teacher.json``, ``runs/<run>/`` (``cut.pt``: the student
right after the cut, ``result-ft<E>.json``, ``history.json`` for mask decay), ``state/`` (in-progress checkpoints,
not needed once a piece is done). ``python -m resnet study-report`` turns the folder into tables and plots.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from tqdm import tqdm

import maskdecay as md

from ..hostinfo import cpu_label
from .config import MASK_METHODS, ConfigError
from .data import DATA_NOTE, Split, load_any, resolve, to_float
from .methods import TP_FORMAT, example_input
from .models import build
from .stream import StepStream, carve
from .training import evaluate, sgd, warmup_cosine

log = logging.getLogger(__name__)

STUDY_METHODS: tuple[str, ...] = ("sparsity", "hard", "l1", "l2", "bn_l1", "group_lasso", "tp_l1", "tp_groupnorm",
                                  "sparsity_loss_only")
"""Methods of the study; ``sparsity_loss_only`` is the sparsity loss without its ceiling (the ablation)."""
NO_STRENGTH: tuple[str, ...] = ("hard", "tp_l1")


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class StudyData:
    path: str | None = "../shared/data/cifar10"
    train: str | None = None
    test: str | None = None
    val_size: int = 5000
    train_subset: int | None = None
    test_subset: int | None = None
    cache: bool = True


@dataclass
class StudyTeacher:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1


@dataclass
class StudyPrune:
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
    extra_seeds: list[int] = field(default_factory=lambda: [1, 2])
    tp_iterative_steps: int = 400

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in STUDY_METHODS]
        if bad:
            raise ConfigError(f"methods: unknown method {bad[0]!r}; use any of {', '.join(STUDY_METHODS)}")
        for k, grid in self.sweep.items():
            if k not in STUDY_METHODS or k in NO_STRENGTH:
                raise ConfigError(f"sweep: {k!r} is not a method with a strength")
            if len(grid) < 1 or any(v <= 0 for v in grid):
                raise ConfigError(f"sweep.{k}: a list of positive strengths")
        wanted = [*self.methods, *(["sparsity_loss_only"] if self.ablation_budgets else [])]
        missing = [m for m in wanted if m not in NO_STRENGTH and m not in self.sweep]
        if missing:
            raise ConfigError(f"sweep: give a grid for {', '.join(missing)}")
        for name in ("budgets", "sweep_budgets", "ablation_budgets"):
            if any(not 0 < b < 1 for b in getattr(self, name)):
                raise ConfigError(f"{name}: MAC fractions strictly between 0 and 1")
        if self.decay_epochs < 1 or self.finetune_epochs < self.sweep_finetune_epochs or self.sweep_finetune_epochs < 1:
            raise ConfigError("decay_epochs >= 1 and finetune_epochs >= sweep_finetune_epochs >= 1")


@dataclass
class StudyConfig:
    name: str = "study"
    out: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
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


def load_config(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read and validate a study config (YAML)."""
    return md.load_config(StudyConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    train: Split
    val: Split
    test: Split


def load_data(cfg: StudyConfig) -> Data:
    """Training split minus the validation split, the validation split, the full test split."""
    train_path, test_path = resolve(cfg.data.path, cfg.data.train, cfg.data.test)
    cache = cfg.out_dir / "cache" if cfg.data.cache else None
    full, test = load_any(train_path, cache), load_any(test_path, cache)
    full, test = full.subset(cfg.data.train_subset, cfg.seed), test.subset(cfg.data.test_subset, cfg.seed)
    train, val = carve(full, cfg.data.val_size, cfg.seed)
    return Data(train, val, test)


# ------------------------------------------------------------------------------------------------------- training
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


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
                after_step: Callable[[], None] | None = None, offset: int = 0) -> list[float]:
    """SGD steps ``first .. last - 1`` (batches ``offset + i`` of ``stream``), ``save(i)`` at every epoch boundary
    and at the end. ``lr_at(i)`` scales ``base_lr``. Returns the mean task loss of each finished epoch."""
    model.train()
    spe = stream.steps_per_epoch
    run_loss = torch.zeros((), device=stream.device)
    epoch_losses: list[float] = []
    bar = _bar(last, first, desc)
    for i in range(first, last):
        xb, yb = stream.batch(offset + i)
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_at(i)
        loss = F.cross_entropy(model(xb), yb)
        total = loss + penalty() if penalty is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        if before_step is not None:
            before_step()
        opt.step()
        if after_step is not None:
            after_step()
        run_loss += loss.detach()
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
    return json.loads(json.dumps({"arch": cfg.arch, "seed": cfg.seed, "val_size": d.val_size,
                                  "train_subset": d.train_subset, **cfg.teacher.__dict__}))


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
                           f"teacher {e + 1}/{t.epochs}")[-1]
        val, test = evaluate(model, data.val), evaluate(model, data.test)
        curve.append({"epoch": e + 1, "train_loss": loss, "val_accuracy": val, "test_accuracy": test,
                      "seconds": time.perf_counter() - t0})
        log.info("teacher epoch %d/%d: loss %.3f, val %.2f %%, test %.2f %%", e + 1, t.epochs, loss, val, test)
        md.atomic_save({"key": key, "step": (e + 1) * spe, "model": model.state_dict(), "opt": opt.state_dict(),
                        "curve": curve, "seconds": time.perf_counter() - t0}, state_path)
    seconds = time.perf_counter() - t0
    md.atomic_save({"key": key, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "test_accuracy": curve[-1]["test_accuracy"], "val_accuracy": curve[-1]["val_accuracy"]},
                   out / "teacher.pt")
    _write_json(out / "teacher.json", {"key": key, "curve": curve, "train_seconds": seconds, "data": DATA_NOTE,
                                       "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
                                       "machine": cpu_label(), "threads": torch.get_num_threads()})
    state_path.unlink(missing_ok=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ one run
@dataclass(frozen=True)
class Run:
    """One pruning run: method, budget, strength (None for methods without one) and seed."""

    method: str
    budget: float
    strength: float | None
    seed: int

    @property
    def name(self) -> str:
        s = "" if self.strength is None else f"-s{self.strength:g}"
        return f"{self.method}-{self.budget:g}{s}-seed{self.seed}"


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

    # --------------------------------------------------------------- helpers
    def _dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def _state(self, run: Run, phase: str) -> Path:
        return self.out / "state" / f"{run.name}-{phase}.pt"

    def _key(self, run: Run) -> dict[str, Any]:
        p = self.p
        return json.loads(json.dumps({
            "run": run.__dict__, "arch": self.cfg.arch, "teacher": _teacher_key(self.cfg),
            "decay_epochs": p.decay_epochs, "batch_size": p.batch_size, "lr": p.lr, "momentum": p.momentum,
            "weight_decay": p.weight_decay, "importance": p.importance, "val_size": self.cfg.data.val_size}))

    def _masked(self, run: Run) -> tuple[nn.Module, md.ChannelMasks, md.Plan, md.MaskDecay]:
        model = copy.deepcopy(self.teacher).to(self.cfg.device)
        masks = md.ChannelMasks(model, example_input(self.cfg.device), ignored_layers=[model.fc])
        plan = md.plan(masks, macs=run.budget, importance=self.p.importance)
        decay = md.MaskDecay(masks, plan, steps=self.decay_steps, schedule="cosine", regularizer=regularizer(run))
        return model, masks, plan, decay

    def _tp_pruner(self, run: Run, model: nn.Module) -> tp.pruner.BasePruner:
        common = dict(global_pruning=True, pruning_ratio=1.0, max_pruning_ratio=0.9,
                      iterative_steps=self.p.tp_iterative_steps, ignored_layers=[model.fc])
        x = example_input(self.cfg.device)
        if run.method == "tp_l1":
            return tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **common)
        return tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                         reg=run.strength, **common)

    def _prune_to_budget(self, pruner: tp.pruner.BasePruner, model: nn.Module, budget: float) -> None:
        target, x = budget * self.teacher_macs, example_input(self.cfg.device)
        while md.count_macs(model, x) > target:
            if pruner.current_step >= pruner.iterative_steps:
                raise ValueError(f"Torch-Pruning could not reach {budget:g} of the MACs; raise tp_iterative_steps")
            pruner.step()

    def _opt(self, model: nn.Module) -> torch.optim.SGD:
        return sgd(model, self.p.lr, self.p.momentum, self.p.weight_decay)

    def _stream(self, run: Run) -> StepStream:
        return StepStream(self.data.train, self.p.batch_size, 1000 + run.seed, self.cfg.device)

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
                        f"{run.name} decay", penalty=decay.penalty, after_step=decay.step)
            student = md.export(model, masks, optimizer=opt)
            _write_json(self._dir(run) / "history.json", decay.history)
            info["cut_jump"] = decay.history.get("cut_jump") or 0.0
            payload = {"format": md.checkpoint.FORMAT, "version": md.checkpoint.VERSION, "plan": plan.to_dict(),
                       "state_dict": student.state_dict(), "config": {"arch": self.cfg.arch}}
            opt_state = opt.state_dict()
        else:
            model = copy.deepcopy(self.teacher).to(self.cfg.device)
            pruner = self._tp_pruner(run, model)
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
                            f"{run.name} sparse", before_step=lambda: pruner.regularize(model))
            self._prune_to_budget(pruner, model, run.budget)
            history = [[n, bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
            payload = {"format": TP_FORMAT, "arch": self.cfg.arch, "tp_history": history,
                       "state_dict": model.state_dict()}
            opt_state = None  # Torch-Pruning replaces the parameters: the fine-tuning starts a new optimizer
            student = model
        info["accuracy_after_cut_val"] = evaluate(student, self.data.val)
        info["decay_seconds"] = elapsed()
        md.atomic_save({**payload, "key": key, "opt": opt_state, "info": info}, path)
        state_path.unlink(missing_ok=True)
        return path

    def load_cut(self, run: Run) -> tuple[nn.Module, dict | None, dict]:
        """The student of ``cut.pt`` (on the study device, NCHW), the optimizer state after the cut, the cut info."""
        path = self._dir(run) / "cut.pt"
        ckpt = _load(path)
        if ckpt["format"] == TP_FORMAT:
            model = build(self.cfg.arch)
            dg = tp.DependencyGraph().build_dependency(model, example_input())
            dg.load_pruning_history([(n, o, list(i)) for n, o, i in ckpt["tp_history"]])
            model.load_state_dict(ckpt["state_dict"], strict=True)
        else:
            model = md.load_pruned(path, lambda: build(self.cfg.arch), example_input())
        return model.to(self.cfg.device, memory_format=torch.contiguous_format), ckpt["opt"], ckpt["info"]

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

        train_steps(model, opt, self._stream(run), start, last, lr_at, self.p.lr, save, f"{run.name} ft{epochs}")
        prof = md.profile(model.cpu().eval(), example_input(), warmup=0, runs=1)
        model.to(self.cfg.device)
        result = {"key": key, "run": run.name, **run.__dict__, "finetune_epochs": epochs,
                  "total_steps": d + ft, "macs": prof.macs, "params": prof.params,
                  "val_accuracy": evaluate(model, self.data.val), **info,
                  "finetune_seconds": seconds + time.perf_counter() - t0}
        if final:
            result["test_accuracy"] = evaluate(model, self.data.test)
            student_path = self._dir(run) / "student.pt"
            md.atomic_save({"format": "resnet-study-student", "cut": str(Path("cut.pt")),
                            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, student_path)
        _write_json(path, result)
        state_path.unlink(missing_ok=True)
        log.info("%s ft%d: val %.2f %%%s, %.2f M MACs", run.name, epochs, result["val_accuracy"],
                 f", test {result['test_accuracy']:.2f} %" if final else "", result["macs"] / 1e6)
        return result

    # --------------------------------------------------------------- sweeps and finals
    def sweep(self, method: str, budget: float, seed: int) -> tuple[float | None, list[dict[str, Any]]]:
        """Sweep ``method``'s strength at ``budget``; returns the chosen strength and the sweep points."""
        if method in NO_STRENGTH:
            return None, []
        grid = sorted(self.p.sweep[method])
        factor = grid[-1] / grid[-2] if len(grid) > 1 else 10.0
        results = {}
        extended = 0
        while True:
            for s in grid:
                if s not in results:
                    results[s] = self.finetune(Run(method, budget, s, seed), self.p.sweep_finetune_epochs, False)
            best = max(grid, key=lambda s: results[s]["val_accuracy"])
            if extended >= self.p.sweep_extend or len(grid) < 2 or best not in (grid[0], grid[-1]):
                break
            grid = [grid[0] / factor, *grid] if best == grid[0] else [*grid, grid[-1] * factor]
            grid = [float(f"{s:.6g}") for s in grid]
            extended += 1
        return best, [results[s] for s in grid]

    def chosen(self, method: str, budget: float) -> tuple[float | None, list[dict[str, Any]]]:
        """The strength for ``method`` at ``budget``: its own sweep, or the sweep of the first swept budget."""
        swept = budget in self.p.sweep_budgets or not self.p.sweep_budgets
        return self.sweep(method, budget if swept else self.p.sweep_budgets[0], self.cfg.seed)

    def final(self, method: str, budget: float, seed: int) -> dict[str, Any]:
        strength, points = self.chosen(method, budget)
        result = self.finetune(Run(method, budget, strength, seed), self.p.finetune_epochs, True)
        return {**result, "sweep": [{"strength": r["strength"], "val_accuracy": r["val_accuracy"]} for r in points]}

    def all(self) -> dict[str, Any]:
        """Every piece, in the order of the module docstring; returns the finals (``summary.json``)."""
        finals: list[dict[str, Any]] = []
        seed = self.cfg.seed
        for budget in self.p.budgets:
            methods = list(self.p.methods)
            if budget in self.p.ablation_budgets and "sparsity_loss_only" not in methods:
                methods.append("sparsity_loss_only")
            for method in methods:
                finals.append(self.final(method, budget, seed))
                self.write_summary(finals)
        first = self.p.budgets[0]
        ranked = sorted((f for f in finals if f["budget"] == first and f["method"] in self.p.methods),
                        key=lambda f: -f["val_accuracy"])
        for f in ranked[:self.p.seed_top]:
            for s in self.p.extra_seeds:
                finals.append(self.final(f["method"], first, s))
                self.write_summary(finals)
        return self.write_summary(finals)

    def write_summary(self, finals: list[dict[str, Any]]) -> dict[str, Any]:
        summary = {"arch": self.cfg.arch, "data": DATA_NOTE, "teacher_macs": self.teacher_macs,
                   "config": json.loads(json.dumps(self.cfg, default=lambda o: o.__dict__)),
                   "finals": [{k: v for k, v in f.items() if k != "key"} for f in finals]}
        _write_json(self.out / "summary.json", summary)
        return summary


def regularizer(run: Run) -> md.Regularizer | str:
    """The maskdecay regularizer of a mask-decay run at its strength."""
    if run.method == "hard":
        return "hard"
    if run.method == "sparsity_loss_only":
        return md.SparsityLoss(strength=run.strength, ceiling=False)
    classes = {"sparsity": md.SparsityLoss, "l1": md.L1, "l2": md.L2, "bn_l1": md.BNScaleL1,
               "group_lasso": md.GroupLasso}
    return classes[run.method](strength=run.strength)


def run(cfg: StudyConfig, stage: str = "all") -> dict[str, Any] | None:
    """The study of ``cfg`` up to ``stage`` (``teacher`` or ``all``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    log.info("data: %d train, %d validation, %d test images (%s); %s, %d threads", len(data.train), len(data.val),
             len(data.test), DATA_NOTE, cpu_label(), torch.get_num_threads())
    tmodel = teacher(cfg, data)
    if stage == "teacher":
        return None
    return Study(cfg, data, tmodel).all()
