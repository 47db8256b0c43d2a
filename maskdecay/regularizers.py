"""Regularizers that drive the removed channels to zero during mask decay.

All share one interface (:class:`Regularizer`) so that :class:`~maskdecay.MaskDecay` can swap them. What each does:

=================  ===============================  ==================  =====================  ===================
regularizer        penalty                          masks learned       removed masks capped   reaches 0 by itself
=================  ===============================  ==================  =====================  ===================
``SparsityLoss``   log(1+|m|/eps), removed only     removed only        yes, at s(t)           yes (no jump)
  scope="all"      log(1+|m|/eps), every unit       all                 no                     no: cut at step N
``"hard"``         none                             no                  set to s(t)            yes (no jump)
``L1``             |m|                              in scope            no                     no: cut at step N
``L2``             m^2                              in scope            no                     no: cut at step N
``BNScaleL1``      |gamma| of norm layers           no                  no                     no: cut at step N
``GroupLasso``     ||weights of the unit||_2        no                  no                     no: cut at step N
=================  ===============================  ==================  =====================  ===================

``scope`` is ``"all"`` (every unit of every group, as these baselines are used in the literature) or ``"removed"``
(only the units the plan drops). With ``scope="all"``, the sparsity loss, L1, L2, BN-L1 and group lasso can also
choose which units go: ``MaskDecay(select="cut")`` keeps the plan's widths and removes the units they shrank most
(:meth:`Regularizer.unit_scores`). The sparsity loss is our design, not the paper's formula (which is not public):
see ``docs/sparsity_loss.md``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .graph import NORM_TYPES
from .importance import member_weights

if TYPE_CHECKING:
    from .decay import MaskDecay


class Regularizer:
    """Base class. Subclasses set the class flags and implement :meth:`penalty`.

    Attributes:
        learns_masks: masks get gradient steps (task loss + penalty) in ``MaskDecay.step``.
        ceiling: removed masks are clamped to ``[0, s(t)]`` after every step.
        follows_schedule: removed masks are set to ``s(t)`` (no learning).
        floor: learned masks are clamped to ``>= 0`` after every step (a pull whose gradient grows near 0 would
            otherwise carry a mask across 0 in one step, and its |m| back up).

    A regularizer that shrinks one quantity per unit also implements :meth:`unit_scores`, so that
    ``MaskDecay(select="cut")`` can remove the units it shrank most.
    """

    name = "base"
    default_strength = 0.0
    learns_masks = False
    ceiling = False
    follows_schedule = False
    floor = False

    def __init__(self, strength: float | None = None, scope: str = "all") -> None:
        strength = self.default_strength if strength is None else strength
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if scope not in ("all", "removed"):
            raise ValueError(f"scope must be 'all' or 'removed', got {scope!r}")
        self.strength = float(strength)
        self.scope = scope
        self.decay: MaskDecay | None = None

    def bind(self, decay: "MaskDecay") -> None:
        """Called once by :class:`~maskdecay.MaskDecay`."""
        self.decay = decay

    def in_scope(self, group_index: int) -> torch.Tensor:
        """Bool vector: the units of a group this regularizer acts on (used as a 0/1 weight, which needs no host
        synchronisation on a GPU, unlike boolean indexing)."""
        assert self.decay is not None
        removed = self.decay.removed_masks[group_index]
        return removed if self.scope == "removed" else torch.ones_like(removed)

    def penalty(self, t: int, s: float) -> torch.Tensor:
        """The penalty to add to the loss at step ``t`` (ceiling ``s``)."""
        raise NotImplementedError

    def unit_scores(self, group_index: int) -> torch.Tensor | None:
        """What this penalty shrinks, one non-negative score per unit of a group (detached, CPU), or None when it
        does not shrink a per-unit quantity (then it cannot choose the units to remove)."""
        return None

    def config(self) -> dict:
        """Name and hyper-parameters, for logs and checkpoints."""
        return {"name": self.name, "strength": self.strength, "scope": self.scope}


class Hard(Regularizer):
    """No loss: removed masks follow the schedule exactly, ``m = s(t)``; kept masks stay 1."""

    name = "hard"
    follows_schedule = True

    def __init__(self) -> None:
        super().__init__(0.0, "removed")

    def penalty(self, t: int, s: float) -> torch.Tensor:
        assert self.decay is not None
        return self.decay.zero()


class _MaskPenalty(Regularizer):
    """A penalty on the masks themselves (learned): it chooses units by |m|."""

    learns_masks = True

    def unit_scores(self, group_index: int) -> torch.Tensor:
        """|m| of every mask of the group."""
        assert self.decay is not None
        return self.decay.masks.values[group_index].detach().abs().cpu()


class SparsityLoss(_MaskPenalty):
    r"""Our sparsity loss: a reweighted-L1 (log-sum) pull on the masks, under a scheduled ceiling.

    .. math::  L_{sp}(t) = \lambda \, (1 - s(t)) \sum_{i \in S} \log(1 + |m_i| / \epsilon), \qquad
               m_i \leftarrow \mathrm{clip}(m_i, 0, s(t)) \text{ for } i \in R \text{ after every step}

    The gradient :math:`\lambda (1-s)/(\epsilon + |m|)` *grows* as a mask approaches 0 (L2's vanishes, L1's is
    constant), so a mask the task does not defend collapses once it starts to fall. The weight :math:`1 - s(t)`
    starts the pull at 0, so the first steps do not shock the teacher.

    Two ways to use it:

    * ``scope="removed"`` (default): ``S = R``, the units the plan removes; kept masks stay exactly 1 and the ceiling
      :math:`s(t)` guarantees every removed mask is 0 at step N. With a removed set fixed in advance, the loss can
      only change *when* those masks reach 0, which a shorter schedule does too (``md.schedules.within``).
      ``ceiling=False`` drops the ceiling (the loss alone pulls the removed masks; what is left is cut at step N).
    * ``scope="all"``: ``S`` = every unit, no ceiling; with ``MaskDecay(select="cut")`` the loss *chooses* the units
      to remove (the smallest |m| at step N, at the plan's widths), like L1 but with a pull meant to separate the
      masks the task defends from those it does not (measured in ``docs/sparsity_loss.md``).

    Either way the masks are kept ``>= 0`` after every step (:attr:`floor`): near 0 the pull is about
    ``strength / eps``, and one plain SGD step of it would carry a mask across 0 and its |m| back up.
    """

    name = "sparsity"
    floor = True  # near 0 one SGD step moves a mask by up to mask_lr * strength / eps

    def __init__(self, strength: float = 1e-2, eps: float = 0.05, ceiling: bool | None = None,
                 scope: str = "removed") -> None:
        super().__init__(strength, scope)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if ceiling and scope == "all":
            raise ValueError("the ceiling caps the plan's removed masks: it needs scope='removed'")
        self.eps = float(eps)
        self.ceiling = scope == "removed" if ceiling is None else bool(ceiling)

    def penalty(self, t: int, s: float) -> torch.Tensor:
        assert self.decay is not None
        total = self.decay.zero()
        for i, v in enumerate(self.decay.masks.values):
            total = total + (torch.log1p(v.abs() / self.eps) * self.in_scope(i)).sum()
        return self.strength * (1.0 - s) * total

    def config(self) -> dict:
        return {**super().config(), "eps": self.eps, "ceiling": self.ceiling}


class _MaskNorm(_MaskPenalty):
    default_strength = 1e-3
    power = 1

    def penalty(self, t: int, s: float) -> torch.Tensor:
        assert self.decay is not None
        total = self.decay.zero()
        for i, v in enumerate(self.decay.masks.values):
            sel = self.in_scope(i)
            total = total + ((v.abs() if self.power == 1 else v.pow(2)) * sel).sum()
        return self.strength * total


class L1(_MaskNorm):
    """``strength * sum |m|`` over the masks in scope; constant strength; removed masks are cut to 0 at step N."""

    name = "l1"
    power = 1


class L2(_MaskNorm):
    """``strength * sum m^2`` over the masks in scope; its pull ``2 m`` vanishes near 0, so masks never reach 0 and
    the cut at step N makes a jump."""

    name = "l2"
    power = 2


class BNScaleL1(Regularizer):
    """Network slimming: ``strength * sum |gamma|`` over the scales of the groups' norm layers (units in scope).

    Masks stay 1 until the cut at step N; the penalty shrinks the norm scales instead.
    """

    name = "bn"
    default_strength = 1e-4

    def penalty(self, t: int, s: float) -> torch.Tensor:
        assert self.decay is not None
        total = self.decay.zero()
        for g in self.decay.masks.groups:
            gammas = self._gammas(g.index)
            if gammas is not None:
                total = total + (gammas * self.in_scope(g.index).to(gammas.device)).sum()
        return self.strength * total

    def _gammas(self, group_index: int) -> torch.Tensor | None:
        """Sum of |gamma| over the group's norm layers, per unit (differentiable; None for a group without one)."""
        assert self.decay is not None
        g = self.decay.masks.groups[group_index]
        total = None
        for m in g.members:
            if isinstance(m.module, NORM_TYPES) and getattr(m.module, "weight", None) is not None:
                w = member_weights(m).abs().sum(1)
                if total is None:
                    total = torch.zeros(g.size, dtype=w.dtype, device=w.device)
                total = total.index_add(0, m.units.to(w.device), w)
        return total

    @torch.no_grad()
    def unit_scores(self, group_index: int) -> torch.Tensor | None:
        """Sum of |gamma| over the group's norm layers, per unit (None for a group without one)."""
        gammas = self._gammas(group_index)
        return None if gammas is None else gammas.double().cpu()


class GroupLasso(Regularizer):
    """``strength * sum_units ||all weights of the unit||_2`` (output rows, input columns, norm scales of every
    member layer), as in group-sparsity pruning. Masks stay 1 until the cut at step N."""

    name = "group_lasso"
    default_strength = 1e-4

    def penalty(self, t: int, s: float) -> torch.Tensor:
        assert self.decay is not None
        total = self.decay.zero()
        for g in self.decay.masks.groups:
            total = total + (self._norms(g.index) * self.in_scope(g.index)).sum()
        return self.strength * total

    def _norms(self, group_index: int) -> torch.Tensor:
        """The L2 norm of every unit's weights (differentiable)."""
        assert self.decay is not None
        g = self.decay.masks.groups[group_index]
        sq = torch.zeros(g.size, device=self.decay.masks.values[group_index].device)
        for m in g.members:
            w = member_weights(m)
            if w is not None:
                sq = sq.index_add(0, m.units.to(sq.device), w.pow(2).sum(1).float())
        return torch.sqrt(sq + 1e-12)

    @torch.no_grad()
    def unit_scores(self, group_index: int) -> torch.Tensor:
        """The L2 norm of every unit's weights."""
        return self._norms(group_index).cpu()


REGULARIZERS: dict[str, type[Regularizer]] = {
    "sparsity": SparsityLoss, "hard": Hard, "l1": L1, "l2": L2, "bn": BNScaleL1, "group_lasso": GroupLasso}


def get_regularizer(reg: str | Regularizer) -> Regularizer:
    """A regularizer instance from a name (default hyper-parameters) or an instance."""
    if isinstance(reg, Regularizer):
        return reg
    if reg not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {reg!r}; use one of {sorted(REGULARIZERS)} or an instance")
    return REGULARIZERS[reg]()

