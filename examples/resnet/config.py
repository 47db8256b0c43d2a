"""YAML configs of the ResNet example, validated into dataclasses with clear errors.

A config has five sections (every key optional, defaults below)::

    name: demo                     # run name; outputs go to out/ (default runs/resnet/<name>)
    seed: 0
    device: cpu                    # where training runs (cuda for the GPU recipe); latency is always timed on CPU
    threads: null                  # torch CPU threads (null: torch's default)
    data:    {path: ../shared/data/cifar10, train: null, test: null, train_subset: null, test_subset: null,
              cache: true}
    model:   {arch: resnet20}
    teacher: {epochs: 30, batch_size: 128, lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4, warmup_epochs: 1.0,
              checkpoint: null}
    prune:   {budgets: [0.5], methods: [sparsity, l1, l2, tp_l1], decay_steps: 1000, finetune_steps: 1000, ...}
    report:  {latency_batch: 64, latency_rounds: 5, latency_runs: 5}

Unknown keys, wrong types and bad values raise :class:`ConfigError` naming the key (with a "did you mean" hint).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import maskdecay as md

from .. import yaml_config
from .models import build

MASK_METHODS: dict[str, str] = {
    "sparsity": "sparsity", "l1": "l1", "l2": "l2", "bn_l1": "bn", "group_lasso": "group_lasso", "hard": "hard"}
"""Mask-decay methods of the example -> maskdecay regularizer names."""
TP_METHODS: tuple[str, ...] = ("tp_l1", "tp_groupnorm")
"""Torch-Pruning baselines: MagnitudePruner (group L1, one-shot) and GroupNormPruner (group sparsity)."""
METHODS: tuple[str, ...] = (*MASK_METHODS, *TP_METHODS)


ConfigError = yaml_config.ConfigError
"""A config that does not validate (maskdecay's typed-config error)."""


@dataclass
class DataConfig:
    path: str | None = "../shared/data/cifar10"
    train: str | None = None
    test: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    cache: bool = True


@dataclass
class ModelConfig:
    arch: str = "resnet20"


@dataclass
class TeacherConfig:
    epochs: float = 30.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    checkpoint: str | None = None


@dataclass
class PruneConfig:
    budgets: list[float] = field(default_factory=lambda: [0.5])
    methods: list[str] = field(default_factory=lambda: ["sparsity", "l1", "l2", "tp_l1"])
    decay_steps: int = 1000
    finetune_steps: int = 1000
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    importance: str = "l1"
    strengths: dict[str, float] = field(default_factory=dict)
    tp_groupnorm_reg: float = 5e-4
    tp_iterative_steps: int = 400


@dataclass
class ReportConfig:
    latency_batch: int = 64
    latency_rounds: int = 5
    latency_runs: int = 5


@dataclass
class Config:
    name: str = "resnet"
    out: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def out_dir(self) -> Path:
        """The run folder."""
        return Path(self.out) if self.out else Path("runs/resnet") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able form."""
        return dataclasses.asdict(self)


def _validate(cfg: Config) -> None:
    p, t = cfg.prune, cfg.teacher
    bad = [m for m in p.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"prune.methods: unknown method {bad[0]!r}; use any of {', '.join(METHODS)}")
    if not p.methods:
        raise ConfigError("prune.methods: give at least one method")
    if len(set(p.methods)) != len(p.methods):
        raise ConfigError("prune.methods: a method is listed twice")
    if not p.budgets or any(not 0 < b < 1 for b in p.budgets):
        raise ConfigError(f"prune.budgets: MAC fractions strictly between 0 and 1, got {p.budgets}")
    for k in p.strengths:
        if k not in MASK_METHODS or k == "hard":
            raise ConfigError(f"prune.strengths: {k!r} is not a mask-decay method with a strength "
                              f"({', '.join(m for m in MASK_METHODS if m != 'hard')})")
        if p.strengths[k] < 0:
            raise ConfigError(f"prune.strengths.{k}: must be >= 0")
    for name in ("train_subset", "test_subset"):
        n = getattr(cfg.data, name)
        if n is not None and n < 1:
            raise ConfigError(f"data.{name}: a positive number of images (or null for all), got {n}")
    checks = [("prune.decay_steps", p.decay_steps >= 1), ("prune.finetune_steps", p.finetune_steps >= 0),
              ("prune.batch_size", p.batch_size >= 1), ("prune.lr", p.lr > 0), ("teacher.epochs", t.epochs >= 0),
              ("teacher.batch_size", t.batch_size >= 1), ("teacher.lr", t.lr > 0),
              ("teacher.warmup_epochs", 0 <= t.warmup_epochs), ("prune.tp_iterative_steps", p.tp_iterative_steps >= 10),
              ("report.latency_batch", cfg.report.latency_batch >= 1),
              ("report.latency_rounds", cfg.report.latency_rounds >= 1),
              ("report.latency_runs", cfg.report.latency_runs >= 1)]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"{name}: value out of range")
    if p.schedule not in ("linear", "cosine", "exp", "step"):
        raise ConfigError(f"prune.schedule: use linear, cosine, exp or step, got {p.schedule!r}")
    if p.importance not in md.IMPORTANCES:
        raise ConfigError(f"prune.importance: use one of {', '.join(md.IMPORTANCES)}, got {p.importance!r}")
    if not (cfg.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", cfg.device)):
        raise ConfigError(f"device: use cpu or cuda[:N], got {cfg.device!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads: a positive number (or null), got {cfg.threads}")
    try:
        build(cfg.model.arch)
    except ValueError as e:
        raise ConfigError(f"model.arch: {e}") from None


def from_dict(raw: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """Validate a raw mapping (plus ``--set KEY=VALUE`` overrides) into a :class:`Config`."""
    cfg = yaml_config.config_from_dict(Config, yaml_config.apply_overrides(dict(raw or {}), overrides))
    _validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read and validate a YAML config file; errors are prefixed with the file name."""
    cfg = yaml_config.load_config(Config, path, overrides)
    try:
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg
