"""Plans: which units of every group the student keeps."""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .importance import ImportanceLike, get_importance
from .masks import ChannelMasks

PLAN_FORMAT = 1


@dataclass
class Plan:
    """The student's shape: for every group, the unit indices it keeps.

    JSON-serialisable with :meth:`to_dict`/:meth:`from_dict`. ``signature`` records the groups of the teacher it was
    made for, so applying it to another model fails with a clear error.
    """

    keep: dict[str, list[int]]
    signature: list[list]
    teacher_macs: float
    macs: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def widths(self) -> dict[str, int]:
        """Kept units per group."""
        return {name: len(k) for name, k in self.keep.items()}

    @property
    def ratio(self) -> float:
        """Predicted student MACs / teacher MACs."""
        return self.macs / self.teacher_macs if self.teacher_macs else 1.0

    def removed(self, name: str) -> list[int]:
        """Unit indices of group ``name`` that the student drops."""
        size = dict((n, s) for n, s in self.signature)[name]
        kept = set(self.keep[name])
        return [u for u in range(size) if u not in kept]

    def check(self, masks: ChannelMasks) -> None:
        """Raise ``ValueError`` unless this plan was made for a model with exactly these groups."""
        mine = [tuple(x) for x in self.signature]
        theirs = [tuple(x) for x in masks.signature()]
        if mine != theirs:
            diff = next(((a, b) for a, b in zip(mine, theirs) if a != b), None)
            detail = (f"first difference: plan has group {diff[0][0]!r} of size {diff[0][1]}, model has "
                      f"{diff[1][0]!r} of size {diff[1][1]}" if diff else
                      f"plan has {len(mine)} groups, model has {len(theirs)}")
            raise ValueError(f"this plan was made for another model ({detail})")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"format": PLAN_FORMAT, "keep": {k: list(map(int, v)) for k, v in self.keep.items()},
                "signature": [[n, int(s)] for n, s in self.signature], "teacher_macs": self.teacher_macs,
                "macs": self.macs, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ValueError("not a maskdecay plan (missing or unknown 'format')")
        return cls(keep={k: list(v) for k, v in d["keep"].items()}, signature=[list(x) for x in d["signature"]],
                   teacher_macs=float(d["teacher_macs"]), macs=float(d["macs"]), meta=dict(d.get("meta", {})))


def _min_keep(size: int, max_ratio: float, round_to: int) -> int:
    keep = max(1, math.ceil(size * (1.0 - max_ratio)))
    return min(size, math.ceil(keep / round_to) * round_to)


def plan(masks: ChannelMasks, macs: float | None = None, widths: dict[str, int] | None = None,
         importance: ImportanceLike = "l1", max_ratio: float = 0.9) -> Plan:
    """Choose the channels the student keeps.

    Give either ``macs`` (a fraction of the teacher's MACs if <= 1, else absolute MACs) for a global ranking of all
    units, or ``widths`` (units to keep per group name; other groups keep everything), which keeps the most
    important units of each named group.

    Global ranking: units are scored by ``importance`` (normalised to mean 1 in each group) and removed, least
    important first, in chunks that keep every group at a multiple of ``masks.round_to``, until the predicted MACs
    reach the target. No group loses more than ``max_ratio`` of its units.

    Raises:
        ValueError: neither or both of ``macs``/``widths``, an unknown group name, a width out of range, or a budget
            that cannot be met.
    """
    if (macs is None) == (widths is None):
        raise ValueError("give exactly one of macs= (a budget) or widths= (units per group)")
    if not 0.0 <= max_ratio < 1.0:
        raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
    criterion = get_importance(importance)
    scores = {g.name: criterion(g) for g in masks.groups}
    order = {name: torch.argsort(s, stable=True).tolist() for name, s in scores.items()}  # least important first
    meta: dict[str, Any] = {"importance": criterion.name,
                            "round_to": masks.round_to, "ignored_layers": masks.ignored_names,
                            "input_spec": masks.input_spec}
    if widths is not None:
        keep = {}
        for name, w in widths.items():
            g = masks[name]
            if not isinstance(w, int) or not 1 <= w <= g.size:
                raise ValueError(f"width of group {name!r} must be an integer in [1, {g.size}], got {w!r}")
            keep[name] = sorted(order[name][g.size - w:])
        for g in masks.groups:
            keep.setdefault(g.name, list(range(g.size)))
        meta["widths"] = dict(widths)
    else:
        target = macs * masks.teacher_macs if macs <= 1.0 else float(macs)
        if macs <= 0:
            raise ValueError(f"macs must be > 0, got {macs}")
        keep = _global_ranking(masks, scores, order, target, max_ratio)
        meta["target_macs"] = target
    return Plan(keep=keep, signature=masks.signature(), teacher_macs=masks.teacher_macs,
                macs=masks.macs(keep), meta=meta)


def _global_ranking(masks: ChannelMasks, scores: dict[str, torch.Tensor], order: dict[str, list[int]],
                    target: float, max_ratio: float) -> dict[str, list[int]]:
    k = masks.round_to
    counter = masks.mac_model.counter(torch.ones(masks.n_units, dtype=torch.bool))
    removed = {g.name: 0 for g in masks.groups}
    floor = {g.name: _min_keep(g.size, max_ratio, k) for g in masks.groups}
    heap: list[tuple[float, int, str, int]] = []
    tiebreak = itertools.count()

    def push(g_name: str, size: int) -> None:
        kept = size - removed[g_name]
        n = kept % k or k  # first chunk brings the group to a multiple of round_to
        if kept - n < floor[g_name]:
            return
        units = order[g_name][removed[g_name]:removed[g_name] + n]
        heapq.heappush(heap, (float(scores[g_name][units].mean()), next(tiebreak), g_name, n))

    for g in masks.groups:
        push(g.name, g.size)
    above = (counter.value, dict(removed))
    while counter.value > target:
        if not heap:
            raise ValueError(
                f"budget of {target / 1e6:.4g} M MACs ({target / masks.teacher_macs:.1%} of the teacher) cannot be "
                f"met: removing all allowed units (max_ratio={max_ratio}, round_to={k}) leaves "
                f"{counter.value / 1e6:.4g} M MACs ({counter.value / masks.teacher_macs:.1%})")
        _, _, name, n = heapq.heappop(heap)
        above = (counter.value, dict(removed))
        g = masks[name]
        for u in order[name][removed[name]:removed[name] + n]:
            counter.remove(masks.offsets[g.index] + u)
        removed[name] += n
        push(name, g.size)
    if above[0] - target < target - counter.value:  # the last chunk overshot: the state before it is closer
        removed = above[1]
    return {g.name: sorted(order[g.name][removed[g.name]:]) for g in masks.groups}
