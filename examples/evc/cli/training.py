"""``evc train``, ``evc decay`` and ``evc rrl``: the command-line front ends of :mod:`..training`."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

from ..training.config import load_config
from ..training.decay import run_decay
from ..training.rrl import run_rrl
from ..training.train import close_distributed, train

__all__ = ["add_parsers", "add_common_args", "add_decay_args", "decay_overrides"]


def add_parsers(sub: Any) -> None:
    """Register ``evc train``, ``evc decay`` and ``evc rrl`` on the CLI's subparsers."""
    p = sub.add_parser("train", help="variable-rate RD training of an EVC model (torchrun for DDP)")
    add_common_args(p)
    p.set_defaults(handler=cmd_train)
    p = sub.add_parser("decay", help="mask decay of a teacher into a smaller EVC student, then fine-tuning")
    add_decay_args(p, "teacher checkpoint")
    p.add_argument("--student", default=None, help="EVC_ML, EVC_SL, EVC_LM, EVC_LS, EVC_MM, EVC_SS (decay.student)")
    p.add_argument("--regularizer", default=None, help="sparsity, l1, l2, hard, bn, group_lasso (decay.regularizer)")
    p.set_defaults(handler=cmd_decay)
    p = sub.add_parser("rrl", help="scalable encoder (Scale_EVC_SS/SL) by residual representation learning")
    add_decay_args(p, "large EVC_LL teacher checkpoint", per=" per level")
    p.add_argument("--base", required=True, help="single-encoder student with an S encoder (EVC_SS or EVC_SL)")
    p.set_defaults(handler=cmd_rrl)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``evc train`` and ``evc decay``."""
    p.add_argument("--config", default=None, help="YAML config (see examples/evc/configs/)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.jsonl, model.pt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=100")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # simulated kill (tests)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def add_decay_args(p: argparse.ArgumentParser, teacher: str, per: str = "") -> None:
    """The options ``evc decay`` and ``evc rrl`` share: the common training ones, ``--teacher`` (described as
    ``teacher``), ``--steps`` and ``--finetune-steps`` (``per``: e.g. " per level"); each overrides its ``decay.*``
    key (see :func:`decay_overrides`)."""
    add_common_args(p)
    p.add_argument("--teacher", default=None, help=f"{teacher} (overrides decay.teacher)")
    p.add_argument("--steps", type=int, default=None, help=f"decay-phase steps{per} (decay.steps)")
    p.add_argument("--finetune-steps", type=int, default=None, help=f"fine-tuning steps{per} (decay.finetune_steps)")


def decay_overrides(args: argparse.Namespace, keys: Sequence[str]) -> list[str]:
    """``args.overrides`` preceded by ``decay.KEY=VALUE`` for each of ``keys`` given as a CLI flag (the explicit
    ``--set`` items come last, so they win)."""
    flags = [f"decay.{k}={json.dumps(getattr(args, k))}" for k in keys if getattr(args, k) is not None]
    return [*reversed(flags), *args.overrides]


def cmd_decay(args: argparse.Namespace) -> int:
    """``evc decay``."""
    sets = decay_overrides(args, ("teacher", "student", "regularizer", "steps", "finetune_steps"))
    cfg = load_config(args.config, sets)
    if cfg.decay is None:
        raise ValueError("the config has no 'decay' section and no --teacher was given")
    summary = run_decay(cfg, args.out, resume=args.resume, stop_after=args.stop_after,
                        progress=not args.no_progress)
    return _finish_command(f"student {summary['student']} ({summary['plan_ratio']:.1%} of the teacher's transform "
                          f"MACs) written to {summary['path']}" if summary["done"] else None, args.out)


def cmd_train(args: argparse.Namespace) -> int:
    """``evc train``."""
    cfg = load_config(args.config, args.overrides)
    _, summary = train(cfg, args.out, resume=args.resume, stop_after=args.stop_after,
                       progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        val = summary["val"]
        msg = f"trained {cfg.model.arch} to step {summary['step']}/{summary['steps']} in {summary['seconds']:.0f} s"
        msg += f" ({summary['skipped']} steps skipped); outputs in {args.out}"
        print(msg)
        if val:
            print("validation (estimated bpp / PSNR per anchor): " + ", ".join(
                f"{b:.3f}/{p:.2f}" for b, p in zip(val["bpp"], val["psnr"])))
    close_distributed()
    return 0


def cmd_rrl(args: argparse.Namespace) -> int:
    """``evc rrl``."""
    sets = decay_overrides(args, ("teacher", "steps", "finetune_steps"))
    cfg = load_config(args.config, sets)
    summary = run_rrl(cfg, args.base, args.out, resume=args.resume, stop_after=args.stop_after,
                      progress=not args.no_progress)
    return _finish_command(f"{summary['arch']} written to {summary['path']}" if summary["done"] else None, args.out)


def _finish_command(done_message: str | None, out: str) -> int:
    """The end of ``evc decay`` / ``evc rrl``: rank 0 prints ``done_message`` (None: stopped early, with how to
    resume), the process group is closed; returns the exit code."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(done_message if done_message is not None
              else f"stopped before the end; resume with --resume (outputs in {out})")
    close_distributed()
    return 0
