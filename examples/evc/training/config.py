"""YAML configuration of ``evc train`` and ``evc decay``: dataclasses with validation.

A config file has the sections ``model``, ``data``, ``optim``, ``train``, ``val`` and (for ``evc decay`` only)
``decay``; every key is optional and has a default. Unknown sections or keys, and values of the wrong type, are
rejected with one ``ValueError`` that names the key (``config.yaml: unknown key 'train.stepz' (did you mean 'steps'?)``).
``--set SECTION.KEY=VALUE`` on the command line overrides a value (VALUE is parsed as YAML).
Relative paths are resolved against the current directory.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ... import yaml_config
from ..models.architectures import ARCHS, SCALE_LAMBDAS

#: students ``evc decay`` makes from an L/L teacher, and the regularizers it offers
STUDENTS = ("EVC_ML", "EVC_SL", "EVC_LM", "EVC_LS", "EVC_MM", "EVC_SS", "EVC_MS")
REGULARIZERS = ("sparsity", "l1", "l2", "hard", "bn", "group_lasso")

__all__ = ["STUDENTS", "REGULARIZERS", "ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "ValConfig", "DecayConfig", "Config",
           "load_config", "config_from_dict"]


@dataclass
class ModelConfig:
    """Which EVC variant to train: a registered name (``EVC_LL``, ``mini_EVC_LL`` ...)."""

    arch: str = "mini_EVC_LL"

    def validate(self) -> None:
        base = self.arch[len("mini_"):] if self.arch.startswith("mini_") else self.arch
        if base not in ARCHS or ARCHS[base][2]:
            raise ValueError(f"model.arch: {self.arch!r} is not a single-encoder EVC variant "
                             f"(expected one of {sorted(a for a in ARCHS if not ARCHS[a][2])}, optionally 'mini_')")


@dataclass
class DataConfig:
    """Training images: random crops from every image under ``train`` (recursively)."""

    train: str = "../shared/data/train/imagenet_samples"
    crop: int = 256            #: square crop side, a multiple of 64
    batch: int = 8             #: global batch (split evenly over DDP ranks)
    small: str = "upscale"     #: images smaller than the crop: "upscale" (shorter side to crop) or "skip"
    workers: int = 0           #: DataLoader worker processes per rank
    hflip: bool = True         #: random horizontal flips

    def validate(self) -> None:
        if self.crop < 64 or self.crop % 64:
            raise ValueError(f"data.crop must be a positive multiple of 64, got {self.crop}")
        if self.batch < 1:
            raise ValueError(f"data.batch must be >= 1, got {self.batch}")
        if self.small not in ("upscale", "skip"):
            raise ValueError(f"data.small must be 'upscale' or 'skip', got {self.small!r}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``lr * min_lr_ratio``; gradient-norm clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0   #: applied to conv weights only (not biases, q_scale, q_basic, entropy-model params)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: int = 0             #: warm-up steps
    schedule: str = "cosine"    #: "cosine" or "constant" after the warm-up
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0      #: max gradient L2 norm (0 = no clipping; non-finite norms always skip the step)

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup < 0:
            raise ValueError(f"optim.warmup must be >= 0, got {self.warmup}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """Loop settings."""

    steps: int = 1000
    seed: int = 0
    amp: str = "none"          #: "none", "bf16" (CPU or CUDA) or "fp16" (CUDA only, with a GradScaler)
    quant: str = "mixed"       #: training proxy: "mixed" (noise for rates, STE for reconstruction) or "ste"
    lambdas: list[float] = field(default_factory=lambda: list(SCALE_LAMBDAS))
    log_every: int = 10        #: JSONL log resolution in steps
    val_every: int = 500       #: Kodak validation every N steps (0 = only at the end)
    ckpt_every: int = 200      #: checkpoint every N steps (and at the end)
    threads: int = 0           #: torch CPU threads (0 = torch's default)
    device: str = "auto"       #: "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    q_scale_min: float = 0.05  #: q_scale anchors are clamped to >= this after every step

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"train.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.quant not in ("mixed", "ste"):
            raise ValueError(f"train.quant must be 'mixed' or 'ste', got {self.quant!r}")
        if len(self.lambdas) != 4 or not all(v > 0 for v in self.lambdas):
            raise ValueError(f"train.lambdas must be 4 positive numbers (one per q_scale anchor), got {self.lambdas}")
        for k in ("log_every", "ckpt_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.val_every < 0 or self.threads < 0:
            raise ValueError("train.val_every and train.threads must be >= 0")
        if not self.q_scale_min > 0:
            raise ValueError(f"train.q_scale_min must be > 0, got {self.q_scale_min}")


@dataclass
class ValConfig:
    """Quick validation: the model's float forward (hard rounding, estimated bits) on a few centre-cropped images at
    the 4 anchors. Real-bitstream results come from ``evc eval``."""

    data: str = "../shared/data/kodak"
    images: int = 4            #: first N images (sorted by name); 0 disables validation
    crop: int = 256            #: centre crop side (multiple of 64)

    def validate(self) -> None:
        if self.images < 0:
            raise ValueError(f"val.images must be >= 0, got {self.images}")
        if self.crop < 64 or self.crop % 64:
            raise ValueError(f"val.crop must be a positive multiple of 64, got {self.crop}")


@dataclass
class DecayConfig:
    """``evc decay``: teacher -> student with mask decay, then fine-tuning (see docs/evc_training.md)."""

    teacher: str = ""                  #: teacher checkpoint (any EVC checkpoint ``evc.load_model`` reads)
    student: str = "EVC_SS"            #: EVC_ML, EVC_SL, EVC_LM, EVC_LS, EVC_MM, EVC_SS (mini_ prefix optional)
    regularizer: str = "sparsity"      #: sparsity, l1, l2, hard, bn, group_lasso
    strength: float = 0.0              #: regularizer strength (0 = the library default)
    schedule: str = "cosine"           #: decay schedule: linear, cosine, exp, step
    importance: str = "l1"             #: which channels the student keeps: l1, l2, taylor
    mask_lr: float = 0.05
    mask_grad_clip: float = 0.0        #: clip mask gradients to +-this before each mask step (0 = off; see docs)
    steps: int = 1000                  #: decay-phase steps (masks reach 0 at the end)
    finetune_steps: int = 1000         #: plain student training after export
    distill_output: float = 1.0        #: weight of lambda*255^2*MSE(student x_hat, teacher x_hat)
    distill_latent: float = 0.0        #: weight of MSE(student y, teacher y) in quantisation steps (encoder students)

    def validate(self) -> None:
        base = self.student[len("mini_"):] if self.student.startswith("mini_") else self.student
        if base not in STUDENTS:
            raise ValueError(f"decay.student must be one of {STUDENTS} (optionally 'mini_'), got {self.student!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"decay.regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if self.schedule not in ("linear", "cosine", "exp", "step"):
            raise ValueError(f"decay.schedule must be linear, cosine, exp or step, got {self.schedule!r}")
        if self.importance not in ("l1", "l2", "taylor"):
            raise ValueError(f"decay.importance must be l1, l2 or taylor, got {self.importance!r}")
        if self.steps < 1 or self.finetune_steps < 0:
            raise ValueError("decay.steps must be >= 1 and decay.finetune_steps >= 0")
        if (self.strength < 0 or self.mask_lr <= 0 or self.distill_output < 0 or self.distill_latent < 0
                or self.mask_grad_clip < 0):
            raise ValueError("decay.strength, mask_grad_clip, distill_output and distill_latent must be >= 0 and "
                             "mask_lr > 0")


@dataclass
class Config:
    """A whole training/decay configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    decay: DecayConfig | None = None

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            sec = getattr(self, f.name)
            if sec is not None:
                sec.validate()
        if self.val.images and self.val.crop % 64:
            raise ValueError("val.crop must be a multiple of 64")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-serialisable); ``decay`` only when set."""
        d = dataclasses.asdict(self)
        if d["decay"] is None:
            del d["decay"]
        return d


def config_from_dict(d: Any, source: str = "config") -> Config:
    """Build and validate a :class:`Config` from a nested dict; ``ValueError`` names the first bad key."""
    return yaml_config.config_from_dict(Config, d, source)


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None = all defaults), apply ``SECTION.KEY=VALUE`` overrides, validate."""
    return yaml_config.load_config(Config, path, overrides)
