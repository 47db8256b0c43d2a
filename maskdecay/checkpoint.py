"""Pruned-model checkpoints: a state_dict plus the plan, never a pickled module."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .export import export
from .masks import ChannelMasks
from .planning import Plan

FORMAT = "maskdecay-pruned"
VERSION = 1


def _plain_open_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves a partial file.
    The file ends with the permissions a plain ``open`` would give it (not the temporary file's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _plain_open_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pruned(path: str | os.PathLike, student: nn.Module, plan: Plan, config: dict | None = None) -> None:
    """Write ``student``'s state_dict with the ``plan`` that shaped it (and an optional JSON-able ``config``)."""
    atomic_save({"format": FORMAT, "version": VERSION, "plan": plan.to_dict(),
                 "state_dict": student.state_dict(), "config": config or {}}, path)


def _example_inputs(plan: Plan) -> Any:
    spec = plan.meta.get("input_spec")
    if not spec:
        raise ValueError("this checkpoint does not record its example inputs (they were not plain tensors): "
                         "pass example_inputs= to load_pruned")
    tensors = [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec]
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def load_pruned(path: str | os.PathLike, build_teacher: Callable[[], nn.Module], example_inputs: Any = None,
                forward_fn: Callable | None = None, output_transform: Callable | None = None) -> nn.Module:
    """Rebuild a student saved by :func:`save_pruned`.

    ``build_teacher()`` must return the teacher architecture (its weights do not matter); the plan is applied to it
    (same groups, same removed channels) and the saved weights are loaded strictly. Loads with
    ``torch.load(weights_only=True)``.

    Raises:
        ValueError: not a maskdecay checkpoint, or the teacher built does not match the plan.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means "not our file"
        raise ValueError(f"{path}: not a loadable maskdecay checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a maskdecay pruned-model checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    plan = Plan.from_dict(ckpt["plan"])
    teacher = build_teacher()
    modules = dict(teacher.named_modules())
    missing = [n for n in plan.meta.get("ignored_layers", []) if n not in modules]
    if missing:
        raise ValueError(f"the teacher built has no layer {missing[0]!r} (ignored when the plan was made)")
    inputs = example_inputs if example_inputs is not None else _example_inputs(plan)
    inputs = inputs.to(next(teacher.parameters()).device) if isinstance(inputs, torch.Tensor) else inputs
    masks = ChannelMasks(teacher, inputs, ignored_layers=[modules[n] for n in plan.meta.get("ignored_layers", [])],
                         round_to=plan.meta.get("round_to", 1), forward_fn=forward_fn,
                         output_transform=output_transform)
    plan.check(masks)
    masks.plan = plan
    student = export(teacher, masks, force=True)
    student.load_state_dict(ckpt["state_dict"], strict=True)
    return student
