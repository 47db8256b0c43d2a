"""Channel importance: one score per unit of a group (higher = more important, kept first)."""
from __future__ import annotations

import logging
from typing import Callable, Union

import torch
import torch.nn as nn

from .graph import NORM_TYPES, Group, Member

log = logging.getLogger(__name__)

Importance = Union[str, Callable[[Group], torch.Tensor]]


def member_weights(m: Member, use_grad: bool = False) -> torch.Tensor | None:
    """Weights of member ``m`` touching each of its group channels ``m.idxs``: a differentiable (channels, k) matrix
    on the layer's device, or None for layers without per-channel weights. With ``use_grad``, the same entries of
    the weight's ``.grad`` instead."""
    mod = m.module
    if isinstance(mod, NORM_TYPES):
        if getattr(mod, "weight", None) is None:
            return None
        w, dim = mod.weight, 0
    elif isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
        w = mod.weight
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
        transposed = getattr(mod, "transposed", False)
        if m.role == "out" or depthwise:
            dim = 1 if transposed else 0
        else:
            dim = 0 if transposed else 1
    else:
        return None
    if use_grad:
        if w.grad is None:
            raise ValueError("importance='taylor' needs gradients: run loss.backward() on a batch before md.plan "
                             f"(layer {m.name!r} has no .grad)")
        w = w.grad
    rows = w.transpose(0, dim).index_select(0, m.idxs.to(w.device))
    return rows.reshape(len(m.idxs), -1)


def _channel_weights(m: Member, use_grad: bool = False) -> torch.Tensor | None:
    """Detached float32 CPU copy of :func:`member_weights`, times the gradient when ``use_grad`` (Taylor)."""
    w = member_weights(m)
    if w is None:
        return None
    if use_grad:
        w = w * member_weights(m, use_grad=True)
    return w.detach().float().cpu()


def _member_scores(group: Group, per_channel: Callable[[Member], torch.Tensor | None]) -> torch.Tensor:
    """Average over members of per-channel scores, each member normalised to mean 1, reduced to units."""
    total = torch.zeros(group.size, dtype=torch.float64)
    count = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        s = per_channel(m)
        if s is None:
            continue
        s = s.double()
        mean = s.mean()
        if mean > 0:
            s = s / mean
        total.index_add_(0, m.units, s)
        count.index_add_(0, m.units, torch.ones_like(s))
    if not bool((count > 0).all()):
        return torch.ones(group.size, dtype=torch.float64)
    return total / count


def _magnitude(p: int, use_grad: bool = False) -> Callable[[Member], torch.Tensor | None]:
    def fn(m: Member) -> torch.Tensor | None:
        w = _channel_weights(m, use_grad)
        if w is None:
            return None
        return w.abs().sum(1) if p == 1 else w.pow(2).sum(1)
    return fn


def _bn_scale(m: Member) -> torch.Tensor | None:
    if not isinstance(m.module, NORM_TYPES):
        return None
    w = _channel_weights(m)
    return None if w is None else w.abs().sum(1)


def group_importance(group: Group, importance: Importance = "l1") -> torch.Tensor:
    """Scores (float64, one per unit, mean 1 within the group) of ``group``.

    ``"l1"``/``"l2"``: L1 norm / squared L2 norm of every weight touching the unit (output rows of producers, input
    columns of consumers, norm scales), each layer normalised to mean 1, averaged over layers (Torch-Pruning's group
    magnitude criterion). ``"bn"``: |scale| of the group's norm layers (groups with none fall back to ``"l1"``).
    ``"taylor"``: |w * dL/dw| summed per unit; run ``loss.backward()`` first. A callable gets the group and returns
    ``group.size`` scores.
    """
    if callable(importance):
        scores = torch.as_tensor(importance(group), dtype=torch.float64).flatten().cpu()
        if scores.numel() != group.size:
            raise ValueError(f"importance callable returned {scores.numel()} scores for group {group.name!r} "
                             f"of size {group.size}")
    elif importance in ("l1", "l2"):
        scores = _member_scores(group, _magnitude(1 if importance == "l1" else 2))
    elif importance == "bn":
        if not any(isinstance(m.module, NORM_TYPES) for m in group.members):
            log.info("group %r has no norm layer: importance 'bn' falls back to 'l1'", group.name)
            return group_importance(group, "l1")
        scores = _member_scores(group, _bn_scale)
    elif importance == "taylor":
        scores = _member_scores(group, _magnitude(1, use_grad=True))
    else:
        raise ValueError(f"unknown importance {importance!r}; use 'l1', 'l2', 'bn', 'taylor' or a callable")
    mean = scores.mean()
    return scores / mean if mean > 0 else scores
