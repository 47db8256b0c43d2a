"""Group discovery, planning and export on the reference nets."""
from __future__ import annotations

import pytest
import torch

import maskdecay as md
from tests.nets import ALL_NETS, example_input

NETS = sorted(ALL_NETS)


def _build(name: str):
    torch.manual_seed(0)
    model = ALL_NETS[name][0]()
    return model, example_input(name, batch=2)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("round_to", [1, 4])
def test_export_equals_masked_teacher(name: str, round_to: int) -> None:
    model, x = _build(name)
    masks = md.ChannelMasks(model, x, round_to=round_to)
    plan = md.plan(masks, macs=0.5)
    decay = md.MaskDecay(masks, plan, steps=2, regularizer="hard")
    decay.step()
    decay.step()
    assert decay.done
    # kept masks other than 1 must be folded into the weights by export
    with torch.no_grad():
        for v, removed in zip(masks.values, decay.removed_masks):
            v[~removed] = torch.empty(int((~removed).sum())).uniform_(0.5, 1.5)
    with torch.no_grad():
        masked = model(x)
    student = md.export(model, masks)
    assert not masks.attached
    with torch.no_grad():
        out = student(x)
    assert out.shape == masked.shape
    assert _rel_diff(masked, out) <= 1e-4
    # the student's measured MACs are the plan's prediction
    assert md.count_macs(student, x) == pytest.approx(plan.macs, rel=1e-9)
    for g in masks.groups:
        kept = len(plan.keep[g.name])
        assert kept == g.size or kept % round_to == 0


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_plan_hits_mac_budget(name: str, fraction: float) -> None:
    model, x = _build(name)
    masks = md.ChannelMasks(model, x)
    plan = md.plan(masks, macs=fraction)
    assert abs(plan.ratio - fraction) <= 0.03
    assert md.Plan.from_dict(plan.to_dict()).keep == plan.keep


def test_pixelshuffle_units_tie_four_conv_channels() -> None:
    model, x = _build("unet")
    masks = md.ChannelMasks(model, x)
    g = masks["up1.conv"]
    assert g.unit_channels == 4
    conv = next(m for m in g.members if m.name == "up1.conv" and m.role == "out")
    assert torch.equal(conv.units, torch.arange(conv.idxs.numel()) // 4)


def test_groupnorm_units_are_whole_norm_groups() -> None:
    model, x = _build("groupnorm")
    masks = md.ChannelMasks(model, x)
    for g in masks.groups:
        for m in g.members:
            if isinstance(m.module, torch.nn.GroupNorm):
                per = m.module.num_channels // m.module.num_groups
                assert torch.equal(m.units, m.idxs // per)


def test_widths_plan_and_explicit_group() -> None:
    model, x = _build("resnet20")
    masks = md.ChannelMasks(model, x)
    name = masks.groups[1].name
    plan = md.plan(masks, widths={name: 5})
    assert plan.widths[name] == 5
    assert all(plan.widths[g.name] == g.size for g in masks.groups if g.name != name)
