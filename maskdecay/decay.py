"""MaskDecay: drives the masks of the channels a plan removes to exactly zero over N training steps."""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from .importance import member_weights
from .masks import ChannelMasks
from .planning import Plan
from .planning import plan as make_plan
from .regularizers import Regularizer, get_regularizer
from .schedules import ScheduleLike, evaluate, get_schedule

log = logging.getLogger(__name__)


class MaskDecay:
    """Runs the decay phase inside your own training loop.

    ::

        decay = md.MaskDecay(masks, plan, steps=2000, schedule="cosine", regularizer="hard")
        for x, y in loader:
            loss = task_loss(model(x), y) + decay.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
            decay.step()           # updates the masks (they are not in your optimizer), advances the schedule

    ``decay.step()`` takes a plain SGD step of size ``mask_lr`` on the masks the regularizer learns (their gradient is
    averaged over ranks under ``torch.distributed``, so every rank keeps identical masks), then applies the
    regularizer's projection (ceiling, schedule). At step ``N`` every removed mask is set to exactly 0 (for L1/L2/BN/
    group-lasso that is a cut, whose size is recorded in ``history["cut_jump"]``) and :attr:`done` becomes True;
    :func:`maskdecay.export` then removes those channels.

    Args:
        masks: the :class:`~maskdecay.ChannelMasks` of the model.
        plan: a :class:`~maskdecay.Plan` made for these masks.
        steps: length N of the decay phase, in optimizer steps.
        schedule: ``"linear"``, ``"cosine"``, ``"exp"``, ``"step"`` or ``f(t, N) -> [0, 1]``.
        regularizer: ``"hard"`` (the removed masks follow the schedule, no loss), ``"sparsity"``, ``"l1"``,
            ``"l2"``, ``"bn"``, ``"group_lasso"`` or an instance (see ``docs/sparsity_loss.md`` for what each
            measured).
        mask_lr: step size of the mask updates.
        mask_grad_clip: clip every mask gradient to ``[-c, c]`` before the step (None: no clipping), so no mask moves
            more than ``mask_lr * c`` per step. Plain SGD on the masks depends on the loss scale: with an image
            codec's ``λ·255²·MSE + bpp`` loss the mask gradients reach ~1e7 and the learned (L1/L2) masks diverge
            in a few steps; ``mask_grad_clip=1.0`` keeps them bounded (classification losses give gradients far
            below 1, where it changes nothing).
        record_every: history resolution in steps (default: about 200 points over the phase).
        scaler: a ``torch.amp.GradScaler`` if you use one, so mask gradients are unscaled.
        select: which units go. ``"plan"``: the plan's removed units, known from step 0 (needed by the schedule-
            driven regularizers). ``"cut"``: the plan's widths, but the units of each group are chosen at step N as
            those the penalty shrank most (smallest :meth:`~maskdecay.Regularizer.unit_scores`: |m| for L1/L2 and
            ``SparsityLoss(scope="all")``, |gamma| for BN-L1, weight norm for group lasso), as sparsity-training
            methods prune; the regularizer's scope must be ``"all"``. The new plan replaces :attr:`plan` (and
            ``masks.plan``), so :func:`maskdecay.export` removes the chosen units.
    """

    def __init__(self, masks: ChannelMasks, plan: Plan, steps: int, schedule: ScheduleLike = "cosine",
                 regularizer: str | Regularizer = "hard", mask_lr: float = 0.05, record_every: int | None = None,
                 scaler: Any = None, mask_grad_clip: float | None = None, select: str = "plan") -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if mask_lr <= 0:
            raise ValueError(f"mask_lr must be > 0, got {mask_lr}")
        if mask_grad_clip is not None and not mask_grad_clip > 0:
            raise ValueError(f"mask_grad_clip must be > 0 or None, got {mask_grad_clip}")
        if select not in ("plan", "cut"):
            raise ValueError(f"select must be 'plan' or 'cut', got {select!r}")
        plan.check(masks)
        self.masks = masks
        self.plan = plan
        masks.plan = plan
        self.steps = steps
        self.schedule_name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "callable")
        self.schedule = get_schedule(schedule)
        self.regularizer = get_regularizer(regularizer)
        self.mask_lr = float(mask_lr)
        self.mask_grad_clip = None if mask_grad_clip is None else float(mask_grad_clip)
        self.record_every = record_every or max(1, steps // 200)
        self.scaler = scaler
        self.t = 0
        device = masks.values[0].device
        self.removed_masks = [torch.zeros(g.size, dtype=torch.bool, device=device) for g in masks.groups]
        self._adopt(plan)
        self.regularizer.bind(self)
        self.select = select
        self._plan0 = plan
        if select == "cut":
            reg = self.regularizer
            scores = type(reg).unit_scores is not Regularizer.unit_scores
            if reg.ceiling or reg.follows_schedule or reg.scope != "all" or not scores:
                raise ValueError(f"select='cut' needs a regularizer that shrinks every unit (scope 'all') and "
                                 f"follows no schedule (l1, l2, bn, group_lasso, SparsityLoss(scope='all')); "
                                 f"{reg.name!r} with scope {reg.scope!r} does not")
        self.learnable = [self.regularizer.in_scope(i) if self.regularizer.learns_masks else torch.zeros_like(r)
                          for i, r in enumerate(self.removed_masks)]
        for v, lrn in zip(masks.values, self.learnable):
            v.requires_grad_(bool(lrn.any()))
        self._norm0 = self._unit_norms()
        self._traced = self._pick_traces()
        self.history: dict[str, Any] = {
            "regularizer": self.regularizer.config(), "schedule": self.schedule_name, "steps": steps,
            "mask_lr": self.mask_lr, "mask_grad_clip": self.mask_grad_clip, "plan_ratio": plan.ratio,
            "step": [], "ceiling": [], "penalty": [],
            "removed_mean": [], "removed_max": [], "kept_mean": [], "kept_min": [], "removed_effective": [],
            "traces": {label: [] for label, _, _ in self._traced}, "cut_jump": None, "select": select}
        self._fixed = [~lrn & ~r for lrn, r in zip(self.learnable, self.removed_masks)]
        self._last_penalty = torch.zeros((), device=device)
        self._skipped = torch.zeros((), dtype=torch.long, device=device)
        self._project()
        self._record()

    # ------------------------------------------------------------------ public
    @property
    def done(self) -> bool:
        """True once N steps have run: every removed mask is exactly 0."""
        return self.t >= self.steps

    @property
    def ceiling(self) -> float:
        """The schedule's value ``s(t)`` now."""
        return evaluate(self.schedule, self.t, self.steps)

    def zero(self) -> torch.Tensor:
        """A scalar 0 on the masks' device (the penalty of a finished decay)."""
        return torch.zeros((), device=self.masks.values[0].device)

    def penalty(self) -> torch.Tensor:
        """The regularizer's loss term for this step (0 once done). Add it to your task loss before ``backward``."""
        if self.done:
            return self.zero()
        p = self.regularizer.penalty(self.t, self.ceiling)
        self._last_penalty = p.detach()
        return p

    @torch.no_grad()
    def step(self) -> None:
        """Update the masks, advance the schedule, project; at step N cut the removed masks to exactly 0."""
        if self.done:
            return
        self._update_masks()
        self.t += 1
        self._project()
        if self.done:
            self._cut()
        if self.t % self.record_every == 0 or self.done:
            self._record()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-decay and get the same trajectory (masks included)."""
        return {"t": self.t, "steps": self.steps, "history": self.history, "masks": self.masks.state_dict(),
                "plan": self.plan.to_dict(), "regularizer": self.regularizer.config(), "mask_lr": self.mask_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same plan and number of steps required)."""
        saved = Plan.from_dict(state["plan"])
        if int(state["t"]) >= self.steps and self.select == "cut":  # a finished decay chose its own units
            if saved.widths != self._plan0.widths:
                raise ValueError("decay state was saved with another plan")
            self._adopt(saved)
        elif saved.keep != self.plan.keep or state["steps"] != self.steps:
            raise ValueError("decay state was saved with another plan or number of steps")
        if state["regularizer"]["name"] != self.regularizer.name:
            raise ValueError(f"decay state was saved with regularizer {state['regularizer']['name']!r}, "
                             f"this decay uses {self.regularizer.name!r}")
        self.t = int(state["t"])
        self.history = state["history"]
        self.masks.load_state_dict(state["masks"])

    # ------------------------------------------------------------------ internals
    def _update_masks(self) -> None:
        if not self.regularizer.learns_masks:
            return
        values = self.masks.values
        grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in values]
        flat = torch.cat(grads)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        if self.scaler is not None and self.scaler.is_enabled():
            flat = flat / self.scaler.get_scale()
        # no host synchronisation per step: a non-finite gradient zeroes the whole update (counted, logged when the
        # history is recorded)
        finite = torch.isfinite(flat).all()
        self._skipped += ~finite
        flat = torch.where(finite, flat, torch.zeros_like(flat))
        if self.mask_grad_clip is not None:
            flat = flat.clamp(-self.mask_grad_clip, self.mask_grad_clip)
        for v, g, lrn in zip(values, flat.split([v.numel() for v in values]), self.learnable):
            v.sub_(self.mask_lr * g * lrn)
        for v in values:
            v.grad = None

    @torch.no_grad()
    def _project(self) -> None:
        s = self.ceiling
        reg = self.regularizer
        for v, removed, fixed in zip(self.masks.values, self.removed_masks, self._fixed):
            if reg.follows_schedule:
                v.masked_fill_(removed, s)
            elif reg.ceiling:
                v.copy_(torch.where(removed, v.clamp(0.0, s), v))
            if reg.floor:
                v.clamp_(min=0.0)
            v.masked_fill_(fixed, 1.0)

    def _select(self) -> None:
        """``select="cut"``: keep the plan's widths, remove the units with the smallest penalised quantity."""
        reg = self.regularizer
        scores = [reg.unit_scores(g.index) for g in self.masks.groups]
        fallback = [torch.ones(g.size, dtype=torch.float64) for g in self.masks.groups]
        chosen = make_plan(self.masks, widths=self._plan0.widths,
                           importance=lambda g: scores[g.index] if scores[g.index] is not None else fallback[g.index])
        chosen.meta["importance"] = f"{reg.name} penalty, at the end of the decay"
        before = sum(len(self._plan0.removed(g.name)) for g in self.masks.groups)
        same = sum(len(set(self._plan0.removed(g.name)) & set(chosen.removed(g.name))) for g in self.masks.groups)
        self.history["reselected"] = 1.0 - same / before if before else 0.0
        self._adopt(chosen)

    def _adopt(self, plan: Plan) -> None:
        self.plan = plan
        self.masks.plan = plan
        for r, g in zip(self.removed_masks, self.masks.groups):
            r.zero_()
            r[torch.tensor(plan.removed(g.name), dtype=torch.long, device=r.device)] = True

    def _cut(self) -> None:
        if self.select == "cut":
            self._select()
        jump = 0.0
        for v, removed in zip(self.masks.values, self.removed_masks):
            if bool(removed.any()):
                jump = max(jump, float(v[removed].abs().max()))
                v[removed] = 0.0
            v.requires_grad_(False)
        self.history["cut_jump"] = jump
        if jump > 0:
            log.info("decay done: removed masks cut to 0 (largest was %.4g)", jump)

    @torch.no_grad()
    def _unit_norms(self) -> list[torch.Tensor]:
        """Per-unit L2 norm of the weights that produce each unit (output rows and norm scales)."""
        norms = []
        for g in self.masks.groups:
            sq = torch.zeros(g.size, dtype=torch.float64)
            for m in g.members:
                if m.role != "out":
                    continue
                w = member_weights(m)
                if w is not None:
                    sq.index_add_(0, m.units, w.detach().double().pow(2).sum(1).cpu())
            norms.append(sq.sqrt())
        return norms

    def _pick_traces(self, n_removed: int = 24, n_kept: int = 8) -> list[tuple[str, int, int]]:
        removed = [(g.index, int(u)) for g, r in zip(self.masks.groups, self.removed_masks)
                   for u in torch.nonzero(r).flatten().tolist()]
        kept = [(g.index, int(u)) for g, r in zip(self.masks.groups, self.removed_masks)
                for u in torch.nonzero(~r).flatten().tolist()]
        out = []
        for kind, pool, n in (("removed", removed, n_removed), ("kept", kept, n_kept)):
            stride = max(1, len(pool) // n)
            for gi, u in pool[::stride][:n]:
                out.append((f"{kind}:{self.masks.groups[gi].name}[{u}]", gi, u))
        return out

    @torch.no_grad()
    def _record(self) -> None:
        h = self.history
        vals = [v.detach().float().cpu() for v in self.masks.values]
        rem = torch.cat([v[r.cpu()] for v, r in zip(vals, self.removed_masks)])
        kept = torch.cat([v[~r.cpu()] for v, r in zip(vals, self.removed_masks)])
        norms = self._unit_norms()
        eff = torch.cat([(v.double().abs() * n / n0.clamp_min(1e-12))[r.cpu()]
                         for v, n, n0, r in zip(vals, norms, self._norm0, self.removed_masks)])
        h["step"].append(self.t)
        h["ceiling"].append(self.ceiling)
        h["penalty"].append(float(self._last_penalty))
        skipped = int(self._skipped)
        if skipped:
            log.warning("non-finite mask gradients: %d mask update(s) skipped before step %d", skipped, self.t)
            self._skipped.zero_()
        h["removed_mean"].append(float(rem.abs().mean()) if rem.numel() else 0.0)
        h["removed_max"].append(float(rem.abs().max()) if rem.numel() else 0.0)
        h["kept_mean"].append(float(kept.mean()) if kept.numel() else 1.0)
        h["kept_min"].append(float(kept.min()) if kept.numel() else 1.0)
        h["removed_effective"].append(float(eff.mean()) if eff.numel() else 0.0)
        for label, gi, u in self._traced:
            x = float(vals[gi][u])
            h["traces"][label].append(x if math.isfinite(x) else None)
