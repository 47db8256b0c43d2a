"""Real CPU speed-up of a pruned CIFAR ResNet against its MAC reduction.

``python -m maskdecay_examples.resnet speedup --arch resnet56 --macs 0.5 --batch 64`` builds the teacher (random
init), plans a student at ``--macs`` of its MACs with maskdecay, zeroes the removed masks (a one-step "hard" decay) and exports it, then times
teacher and student in turns (eval forward, ``--batch`` images, channels_last). Latency depends on the layer shapes,
not on the weight values; but the *plan* (which widths survive) depends on the weights the importance ranks, so a
student exported from a trained teacher can have other widths: pass ``--student PATH`` (a ``student.pt`` written by
``python -m maskdecay_examples.resnet prune``) to time that one instead.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import maskdecay as md

from .methods import example_input, load_student
from .models import build
from .report import latencies


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``speedup`` command's options."""
    p.add_argument("--arch", default="resnet56", help="teacher architecture")
    p.add_argument("--macs", type=float, default=0.5, help="student MACs as a fraction of the teacher's")
    p.add_argument("--batch", type=int, default=64, help="images per timed forward pass")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds (teacher and student in turns)")
    p.add_argument("--runs", type=int, default=5, help="forward passes per model per round")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    p.add_argument("--importance", default="l1", help="plan importance (l1, l2, bn)")
    p.add_argument("--student", help="time this saved student (student.pt of a prune run) instead of planning one")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result as JSON")


def planned_student(teacher: nn.Module, macs: float, round_to: int, importance: str) -> nn.Module:
    """Plan a ``macs`` student of ``teacher`` (a copy is pruned) and export it with the removed masks at 0."""
    model = copy.deepcopy(teacher)
    masks = md.ChannelMasks(model, example_input(), ignored_layers=[model.fc], round_to=round_to)
    plan = md.plan(masks, macs=macs, importance=importance)
    decay = md.MaskDecay(masks, plan, steps=1, regularizer="hard")
    decay.step()
    return md.export(model, masks)


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, by layer name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time teacher and student; the result dict of the command."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    teacher = build(args.arch).eval()
    if args.student:
        student = load_student(Path(args.student), args.arch)
    else:
        student = planned_student(teacher, args.macs, args.round_to, args.importance)
    teacher = teacher.to(memory_format=torch.channels_last)
    student = student.to(memory_format=torch.channels_last).eval()
    x = example_input()
    macs_t, macs_s = md.count_macs(teacher, x), md.count_macs(student, x)
    lat = latencies({"teacher": teacher, "student": student}, args.batch, args.rounds, args.runs, args.seed)
    reduction, speedup = macs_t / macs_s, lat["teacher"] / lat["student"]
    return {"arch": args.arch, "student": args.student or f"planned at {args.macs:g} MACs (random-init teacher)",
            "batch": args.batch, "threads": torch.get_num_threads(), "round_to": args.round_to,
            "teacher_macs": macs_t, "student_macs": macs_s, "teacher_ms": lat["teacher"], "student_ms": lat["student"],
            "mac_reduction": reduction, "speedup": speedup, "ratio": speedup / reduction,
            "student_widths": widths(student)}


def main(args: argparse.Namespace) -> None:
    """Print the comparison (and write JSON)."""
    r = measure(args)
    print(f"{r['arch']} CPU inference, batch {r['batch']}, {r['threads']} threads, median of interleaved runs")
    print(f"{'model':<8} {'MACs':>9} {'latency':>10}")
    print(f"{'teacher':<8} {r['teacher_macs'] / 1e6:>8.2f}M {r['teacher_ms']:>8.2f}ms")
    print(f"{'student':<8} {r['student_macs'] / 1e6:>8.2f}M {r['student_ms']:>8.2f}ms   ({r['student']})")
    print(f"MAC reduction {r['mac_reduction']:.2f}x, real speed-up {r['speedup']:.2f}x, "
          f"ratio {r['ratio']:.2f} (target >= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}")
