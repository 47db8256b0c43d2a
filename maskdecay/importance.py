"""Channel importance: one score per unit of a group (higher = more important, kept first).

Criteria are objects with one interface (:class:`Importance`), as the regularizers are; :data:`IMPORTANCES` maps the
names accepted wherever a criterion is asked for (``md.plan(..., importance="l2")``, configs) to their classes:

=============  ===================================================================================================
name           score of a unit
=============  ===================================================================================================
``"l1"``       L1 norm of every weight touching the unit (output rows of producers, input columns of consumers,
               norm scales), each layer normalised to mean 1, averaged over layers (Torch-Pruning's group
               magnitude criterion): :class:`L1Importance`
``"l2"``       the same with squared L2 norms: :class:`L2Importance`
``"bn"``       |scale| of the group's norm layers; groups without one fall back to ``"l1"``: :class:`BNImportance`
``"taylor"``   |w * dL/dw| summed per unit (run ``loss.backward()`` first): :class:`TaylorImportance`
=============  ===================================================================================================

A new criterion subclasses :class:`Importance` (implementing :meth:`Importance.scores`) and is passed as an instance,
or registered under a name in :data:`IMPORTANCES`. A plain callable ``group -> scores`` works too.
"""
from __future__ import annotations

import logging
from typing import Callable, Union

import torch
import torch.nn as nn

from .graph import NORM_TYPES, Group, Member

log = logging.getLogger(__name__)

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


class Importance:
    """Base class of the importance criteria: :meth:`scores` gives one raw score per unit of a group, calling the
    object gives them as float64, normalised to mean 1 within the group."""

    name = "base"

    def scores(self, group: Group) -> torch.Tensor:
        """Raw scores, one per unit of ``group`` (any float dtype, CPU)."""
        raise NotImplementedError

    def __call__(self, group: Group) -> torch.Tensor:
        scores = torch.as_tensor(self.scores(group), dtype=torch.float64).flatten().cpu()
        if scores.numel() != group.size:
            raise ValueError(f"importance {self.name!r} returned {scores.numel()} scores for group {group.name!r} "
                             f"of size {group.size}")
        mean = scores.mean()
        return scores / mean if mean > 0 else scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L1Importance(Importance):
    """L1 norm of every weight touching the unit, each member layer normalised to mean 1, averaged over layers."""

    name = "l1"
    power = 1

    def scores(self, group: Group) -> torch.Tensor:
        return _member_scores(group, self._per_channel)

    def _per_channel(self, m: Member) -> torch.Tensor | None:
        w = _channel_weights(m, use_grad=False)
        if w is None:
            return None
        return w.abs().sum(1) if self.power == 1 else w.pow(2).sum(1)


class L2Importance(L1Importance):
    """Squared L2 norm of every weight touching the unit, normalised and averaged as in :class:`L1Importance`."""

    name = "l2"
    power = 2


class BNImportance(Importance):
    """|scale| of the group's norm layers (BatchNorm, GroupNorm, ...); a group without one is scored by
    :class:`L1Importance`."""

    name = "bn"

    def scores(self, group: Group) -> torch.Tensor:
        if not any(isinstance(m.module, NORM_TYPES) for m in group.members):
            log.info("group %r has no norm layer: importance 'bn' falls back to 'l1'", group.name)
            return L1Importance().scores(group)
        return _member_scores(group, _bn_scale)


class TaylorImportance(Importance):
    """|w * dL/dw| summed per unit (first-order Taylor estimate of the loss change); needs ``.grad`` on the weights,
    so run ``loss.backward()`` on a batch first."""

    name = "taylor"

    def scores(self, group: Group) -> torch.Tensor:
        return _member_scores(group, lambda m: _grad_weighted(m))


class _CallableImportance(Importance):
    """A plain function ``group -> scores`` as an :class:`Importance`."""

    name = "callable"

    def __init__(self, fn: Callable[[Group], torch.Tensor]) -> None:
        self.fn = fn

    def scores(self, group: Group) -> torch.Tensor:
        return self.fn(group)


def _grad_weighted(m: Member) -> torch.Tensor | None:
    w = _channel_weights(m, use_grad=True)
    return None if w is None else w.abs().sum(1)


def _bn_scale(m: Member) -> torch.Tensor | None:
    if not isinstance(m.module, NORM_TYPES):
        return None
    w = _channel_weights(m)
    return None if w is None else w.abs().sum(1)


#: the criteria known by name (add an entry to make a new criterion available by name)
IMPORTANCES: dict[str, type[Importance]] = {
    "l1": L1Importance, "l2": L2Importance, "bn": BNImportance, "taylor": TaylorImportance}

#: what an ``importance`` argument accepts: a name of :data:`IMPORTANCES`, an :class:`Importance` or a callable
ImportanceLike = Union[str, Importance, Callable[[Group], torch.Tensor]]


def get_importance(importance: ImportanceLike) -> Importance:
    """An importance criterion from a name (see :data:`IMPORTANCES`), an instance, or a callable
    ``group -> scores``."""
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str):
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {importance!r}; use one of {sorted(IMPORTANCES)}, an Importance "
                             "or a callable")
        return IMPORTANCES[importance]()
    if callable(importance):
        return _CallableImportance(importance)
    raise ValueError(f"importance must be a name, an Importance or a callable, got {type(importance).__name__}")


def group_importance(group: Group, importance: ImportanceLike = "l1") -> torch.Tensor:
    """Scores (float64, one per unit, mean 1 within the group) of ``group`` under ``importance`` (a name of
    :data:`IMPORTANCES`, an :class:`Importance`, or a callable returning ``group.size`` scores)."""
    return get_importance(importance)(group)
