"""Physical removal of masked units, and the check that it is exact (student output == masked teacher output)."""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from .graph import NORM_TYPES, Group, Member
from .macs import run_model

if TYPE_CHECKING:
    from .masks import ChannelMasks

log = logging.getLogger(__name__)


def fold_masks(groups: list[Group], values: list[torch.Tensor], dead: list[torch.Tensor],
               lookup: Callable[[Member], nn.Module]) -> None:
    """Multiply the mask values of kept units (where not all 1) into the layers they follow, so removal changes
    nothing. ``lookup`` gives the layer to change for a member (the member's own, or the same layer of a copy)."""
    with torch.no_grad():
        for g, v, d in zip(groups, values, dead):
            for mp in g.mask_points:
                scale = v.detach()[mp.units.to(v.device)]
                if bool((scale[~d.to(v.device)[mp.units.to(v.device)]] == 1).all()):
                    continue
                mod = lookup(mp)
                if isinstance(mod, NORM_TYPES) and getattr(mod, "weight", None) is None:
                    raise ValueError(f"cannot fold mask values into {mp.name!r}: the norm layer has no affine scale")
                dim = 1 if getattr(mod, "transposed", False) else 0
                idx = mp.idxs.to(mod.weight.device)
                shape = [1] * mod.weight.dim()
                shape[dim] = -1
                mod.weight.index_copy_(dim, idx, mod.weight.index_select(dim, idx) * scale.to(mod.weight).view(shape))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.index_copy_(0, idx, mod.bias[idx] * scale.to(mod.bias))


def removals(groups: list[Group], dead: list[torch.Tensor]) -> dict[str, tuple[nn.Module, dict[Callable, set[int]]]]:
    """``{layer name: (layer, {pruning function: channels})}`` removing the dead units of every group."""
    per_module: dict[str, tuple[nn.Module, dict[Callable, set[int]]]] = {}
    for g, d in zip(groups, dead):
        for m in g.members:
            chans = m.idxs[d[m.units]].tolist()
            if chans:
                per_module.setdefault(m.name, (m.module, defaultdict(set)))[1][m.handler].update(chans)
    return per_module


def prune_module(module: nn.Module, ops: dict[Callable, set[int]]) -> None:
    """Apply the pruning functions to ``module`` (a GroupNorm keeps its channels per norm group)."""
    per_group = module.num_channels // module.num_groups if isinstance(module, nn.GroupNorm) else None
    for handler, idxs in ops.items():
        handler(module, sorted(idxs))
    if per_group is not None:
        module.num_groups = module.num_channels // per_group


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    out = list(out.values()) if isinstance(out, dict) else out
    return [t for o in out for t in _tensors(o)] if isinstance(out, (list, tuple)) else []


def _outputs(masks: ChannelMasks, model: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        out = run_model(model, masks.example_inputs, masks.forward_fn)
    return _tensors(masks.output_transform(out) if masks.output_transform else out)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal up to float rounding: shapes equal, values within 1e-3 relative or 1e-4 of the largest output."""
    def close(x: torch.Tensor, y: torch.Tensor) -> bool:
        scale = float(x.float().nan_to_num(0, 0, 0).abs().max()) if x.numel() else 0.0
        return torch.allclose(y.float(), x.float(), rtol=1e-3, atol=1e-4 * scale, equal_nan=True)
    return len(a) == len(b) and all(x.shape == y.shape and close(x, y) for x, y in zip(a, b))


def inexact_groups(masks: ChannelMasks, dead: list[torch.Tensor], values: list[torch.Tensor]) -> list[int] | None:
    """Indices of the groups whose removal of units ``dead`` changes the output of the masked model.

    Reference: the model with masks ``values`` (dead units at 0), eval mode, example inputs. Each check removes the
    dead units of some groups (bisected) from a copy and compares its output (an exception counts as a change).
    None when two identical forward passes differ (a non-deterministic model cannot be checked).
    """
    model, attached = masks.model, masks.attached
    modes = {m: m.training for m in model.modules()}
    saved = [v.detach().clone() for v in masks.values]
    values = [v.detach() * ~d.to(v.device) for v, d in zip(values, dead)]
    try:
        model.eval()
        masks.attach()
        with torch.no_grad():
            for p, v in zip(masks.values, values):
                p.copy_(v)
        ref = _outputs(masks, model)
        if not _same(ref, _outputs(masks, model)):
            log.info("two identical forward passes of %s differ: exactness not checked", type(model).__name__)
            return None
        masks.remove()

        def changes(subset: list[int]) -> bool:
            keep = set(subset)
            sub = [d if i in keep else torch.zeros_like(d) for i, d in enumerate(dead)]
            twin = copy.deepcopy(model)
            try:
                fold_masks(masks.groups, values, sub, lambda m: twin.get_submodule(m.name))
                for name, (_, ops) in removals(masks.groups, sub).items():
                    prune_module(twin.get_submodule(name), ops)
                return not _same(ref, _outputs(masks, twin))
            except Exception as e:  # noqa: BLE001 -- any failure of the pruned copy means the groups are faulty
                log.debug("pruned copy failed: %s", e)
                return True

        bad: list[int] = []

        def bisect(subset: list[int]) -> None:  # ``subset`` changes the output
            found = len(bad)
            for half in (subset[:len(subset) // 2], subset[len(subset) // 2:]) if len(subset) > 1 else ():
                if changes(half):
                    bisect(half)
            if len(bad) == found:  # a single group, or only the halves together change it
                bad.extend(subset)

        candidates = [i for i, d in enumerate(dead) if bool(d.any())]
        if candidates and changes(candidates):
            bisect(candidates)
        return bad
    finally:
        with torch.no_grad():
            for p, v in zip(masks.values, saved):
                p.copy_(v)
        (masks.attach if attached else masks.remove)()
        for m, mode in modes.items():
            m.training = mode
