"""Teacher -> student: physically remove the channels whose masks are zero, remap the optimizer state."""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

from .masks import ChannelMasks
from .planning import Plan
from .shrink import fold_masks, inexact_groups, prune_module, removals

log = logging.getLogger(__name__)


def _dead_units(masks: ChannelMasks, plan: Plan | None, force: bool) -> list[torch.Tensor]:
    dead = []
    for g, v in zip(masks.groups, masks.values):
        if plan is None:
            d = (v.detach() == 0).cpu()
        else:
            d = torch.zeros(g.size, dtype=torch.bool)
            d[torch.tensor(plan.removed(g.name), dtype=torch.long)] = True
            live = v.detach().cpu()[d]
            if not force and bool((live != 0).any()):
                raise ValueError(
                    f"masks of removed channels in group {g.name!r} are not zero yet (largest {float(live.abs().max()):.3g}): "
                    "run the decay to the end (decay.done) or pass force=True to cut them now")
        if bool(d.all()):
            raise ValueError(f"every unit of group {g.name!r} would be removed; keep at least one")
        dead.append(d)
    return dead


def _remap_optimizer(optimizer: torch.optim.Optimizer, before: nn.Module, module: nn.Module,
                     old: dict[str, nn.Parameter], ops: dict[Callable, set[int]]) -> None:
    """Give the new parameters of ``module`` the optimizer slots of the old ones, sliced like the weights.

    Each state tensor (momentum, Adam moments...) is pruned by the very same functions as the weights, on a copy of
    the layer taken before pruning (``before``) whose parameters hold that state.
    """
    new = dict(module.named_parameters(recurse=False))
    states = {name: optimizer.state.pop(p, None) for name, p in old.items()}
    keys = {k for st in states.values() if st for k, val in st.items()
            if isinstance(val, torch.Tensor) and val.dim() > 0}
    sliced: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in keys:
        probe = copy.deepcopy(before)
        with torch.no_grad():
            for name, p in probe.named_parameters(recurse=False):
                st = states.get(name) or {}
                val = st.get(key)
                p.data = val.clone() if isinstance(val, torch.Tensor) and val.shape == p.shape else torch.zeros_like(p)
        prune_module(probe, ops)
        for name, p in probe.named_parameters(recurse=False):
            if states.get(name) and key in states[name]:
                sliced[name][key] = p.data.clone()
    for name, p_old in old.items():
        p_new = new[name]
        for pg in optimizer.param_groups:
            pg["params"] = [p_new if q is p_old else q for q in pg["params"]]
        st = states.get(name)
        if st:
            optimizer.state[p_new] = {k: (sliced[name].get(k, v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                                      for k, v in st.items()}


def export(model: nn.Module, masks: ChannelMasks, optimizer: torch.optim.Optimizer | None = None,
           force: bool = False, verify: bool = True) -> nn.Module:
    """Remove the channels the plan drops (masks at 0) from ``model`` in place and return it.

    The result is the teacher's own weights minus the dead channels; its outputs equal the masked teacher's (kept
    mask values other than 1 are folded into the preceding weights). The mask hooks are detached.

    Args:
        model: the masked teacher (the model given to ``ChannelMasks``).
        masks: its masks. With a plan attached (``MaskDecay`` attaches it) exactly the plan's removed units go, and
            their masks must be 0; without one, every unit whose mask is exactly 0 goes.
        optimizer: if given, its parameters are replaced by the pruned ones and its per-parameter state (momentum,
            Adam moments) is sliced the same way, so training continues where it was.
        force: cut removed masks that are not 0 yet (changes the outputs).
        verify: before changing ``model``, check on a copy, on the example inputs (eval mode), that the student's
            output equals the masked teacher's (with the removed masks at 0). Costs a copy of the model and a few
            forward passes.

    Raises:
        ValueError: removed masks are not 0 (and not ``force``), a group would lose every unit, the masks were
            already exported, or (``verify``) the student would differ from the masked teacher; the message names
            the groups responsible and ``model`` is left unchanged.
    """
    if getattr(masks, "exported", False):
        raise ValueError("these masks were already exported; build new ChannelMasks for another export")
    dead = _dead_units(masks, masks.plan, force)
    if verify and (bad := inexact_groups(masks, dead, masks.values)):
        raise ValueError(
            "the student would differ from the masked teacher on the example inputs; removing the units of "
            f"group(s) {', '.join(repr(masks.groups[i].name) for i in bad)} changes the output. Exclude their "
            "root layers (ignored_layers) or report the model")
    fold_masks(masks.groups, masks.values, dead, lambda m: m.module)
    masks.remove()
    per_module = removals(masks.groups, dead)
    for module, ops in per_module.values():
        old = dict(module.named_parameters(recurse=False))
        frozen = {name for name, p in old.items() if not p.requires_grad}
        before = copy.deepcopy(module) if optimizer is not None else None
        prune_module(module, ops)
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(name not in frozen)
        if optimizer is not None:
            _remap_optimizer(optimizer, before, module, old, ops)
    masks.exported = True
    log.info("exported: %d layers shrunk", len(per_module))
    return model
