"""Teacher -> student: physically remove the channels whose masks are zero, remap the optimizer state."""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn

from .graph import NORM_TYPES
from .masks import ChannelMasks
from .planning import Plan

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


def _fold_kept_masks(masks: ChannelMasks, dead: list[torch.Tensor]) -> None:
    """Multiply mask values != 1 into the weights of the layers they follow, so removal changes nothing."""
    with torch.no_grad():
        for g, v, d in zip(masks.groups, masks.values, dead):
            for mp in g.mask_points:
                scale = v.detach()[mp.units.to(v.device)]
                live = ~d.to(v.device)[mp.units.to(v.device)]
                if bool((scale[live] == 1).all()):
                    continue
                mod = mp.module
                if isinstance(mod, NORM_TYPES) and getattr(mod, "weight", None) is None:
                    raise ValueError(f"cannot fold mask values into {mp.name!r}: the norm layer has no affine scale")
                transposed = getattr(mod, "transposed", False)
                dim = 1 if transposed else 0
                idx = mp.idxs.to(mod.weight.device)
                shape = [1] * mod.weight.dim()
                shape[dim] = -1
                w = mod.weight.index_select(dim, idx) * scale.to(mod.weight).view(shape)
                mod.weight.index_copy_(dim, idx, w)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.index_copy_(0, idx, mod.bias[idx] * scale.to(mod.bias))


def _prune_module(module: nn.Module, ops: list[tuple[Callable, list[int]]]) -> None:
    groups_per = None
    if isinstance(module, nn.GroupNorm):
        groups_per = module.num_channels // module.num_groups
    for handler, idxs in ops:
        handler(module, idxs)
    if groups_per is not None:
        module.num_groups = module.num_channels // groups_per


def _remap_optimizer(optimizer: torch.optim.Optimizer, before: nn.Module, module: nn.Module,
                     old: dict[str, nn.Parameter], ops: list[tuple[Callable, list[int]]]) -> None:
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
        _prune_module(probe, ops)
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
           force: bool = False) -> nn.Module:
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

    Raises:
        ValueError: removed masks are not 0 (and not ``force``), a group would lose every unit, or the masks were
            already exported.
    """
    if getattr(masks, "exported", False):
        raise ValueError("these masks were already exported; build new ChannelMasks for another export")
    plan = masks.plan
    dead = _dead_units(masks, plan, force)
    _fold_kept_masks(masks, dead)
    masks.remove()
    per_module: dict[int, tuple[nn.Module, dict[Callable, set[int]]]] = {}
    for g, d in zip(masks.groups, dead):
        if not bool(d.any()):
            continue
        for m in g.members:
            chans = m.idxs[d[m.units]].tolist()
            if chans:
                entry = per_module.setdefault(id(m.module), (m.module, defaultdict(set)))
                entry[1][m.handler].update(chans)
    for module, handlers in per_module.values():
        ops = [(h, sorted(idxs)) for h, idxs in handlers.items()]
        old = dict(module.named_parameters(recurse=False))
        frozen = {name for name, p in old.items() if not p.requires_grad}
        before = copy.deepcopy(module) if optimizer is not None else None
        _prune_module(module, ops)
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(name not in frozen)
        if optimizer is not None:
            _remap_optimizer(optimizer, before, module, old, ops)
    masks.exported = True
    log.info("exported: %d layers shrunk", len(per_module))
    return model
