"""The channel couplings of the common model zoos (tests/zoo_nets.py): exact export and the expected coverage."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import maskdecay as md
from tests.zoo_nets import ZOO, classifier

# Layers left whole per net (the classifier is ignored in every test), with a fragment of the reason.
EXPECTED_WHOLE: dict[str, dict[str, str]] = {
    "densenet": {},
    "csp": {},
    "res2net": {f"blocks.{b}.{layer}": "exactness check" for b in (0, 1)
                for layer in ("conv1.0", "convs.0.0", "convs.1.0")},
    "shufflenet": {"stage.0.branch1.2.0": "crosses view", "stage.0.branch2.3.0": "crosses view",
                   "stage.1.branch2.3.0": "crosses view", "stage.2.branch2.3.0": "crosses view"},
    "resnext": {},
    "senet": {},
    "attention": {"patch_embed": "crosses flatten", "blocks.0.attn.qkv": "crosses reshape",
                  "blocks.1.attn.qkv": "crosses reshape", "blocks.0.attn.proj": "LayerNorm",
                  "blocks.1.attn.proj": "LayerNorm", "blocks.0.mlp.2": "LayerNorm", "blocks.1.mlp.2": "LayerNorm"},
    "convnext": {"stem": "crosses permute", "blocks.0.dwconv": "crosses permute", "blocks.1.dwconv": "crosses permute",
                 "blocks.0.pwconv2": "crosses permute", "blocks.1.pwconv2": "crosses permute"},
}


def _masks(name: str, **kw) -> tuple[nn.Module, torch.Tensor, md.ChannelMasks]:
    torch.manual_seed(0)
    model = ZOO[name]()
    x = torch.randn(2, 3, 32, 32)
    return model, x, md.ChannelMasks(model, x, ignored_layers=[classifier(model)], **kw)


def _decayed(masks: md.ChannelMasks, macs: float = 0.6) -> md.Plan:
    plan = md.plan(masks, macs=macs)
    decay = md.MaskDecay(masks, plan, steps=1, regularizer="hard")
    decay.step()
    with torch.no_grad():  # kept masks other than 1 must be folded into the weights by export
        for v, removed in zip(masks.values, decay.removed_masks):
            v[~removed] = torch.empty(int((~removed).sum())).uniform_(0.5, 1.5)
    return plan


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_export_is_exact(name: str) -> None:
    model, x, masks = _masks(name)
    plan = _decayed(masks)
    with torch.no_grad():
        masked = model(x)
    student = md.export(model, masks)
    with torch.no_grad():
        out = student(x)
    assert out.shape == masked.shape
    assert float((out - masked).abs().max()) <= 1e-4 * float(masked.abs().max())
    assert md.count_macs(student, x) == pytest.approx(plan.macs, rel=1e-9)
    assert plan.ratio < 0.65


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_coverage(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="maskdecay"):
        model, _, masks = _masks(name)
    expected = {n: "ignored" for n, m in model.named_modules() if m is classifier(model)}
    expected.update(EXPECTED_WHOLE[name])
    assert sorted(masks.unpruned) == sorted(expected)
    for layer, fragment in expected.items():
        assert fragment in masks.unpruned[layer], (layer, masks.unpruned[layer])
    grouped = {m.name for g in masks.groups for m in g.members if m.role == "out"}
    for layer, m in model.named_modules():  # every conv/linear layer is in a group or listed with a reason
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert (layer in grouped) != (layer in masks.unpruned), layer
    lines = [r for r in caplog.records if r.name == "maskdecay.masks" and r.levelno == logging.INFO]
    assert len(lines) == 1 and all(layer in lines[0].getMessage() for layer in expected)


def test_densenet_growth_convs_get_groups() -> None:
    _, _, masks = _masks("densenet")
    for b in (1, 2):
        for i in range(3):
            g = masks[f"block{b}.{i}.conv2"]
            assert g.size == 8 and all(m.idxs.numel() for m in g.members)
    # the BN over the concatenation of the stem and every layer is a member of each producer's group
    norm = "block1.2.norm1"
    owners = {g.name for g in masks.groups for m in g.members if m.name == norm}
    assert owners == {"conv0", "block1.0.conv2", "block1.1.conv2"}


def test_equal_chunks_are_tied() -> None:
    _, _, masks = _masks("csp")
    g = masks["stages.0.conv_exp.0"]
    assert g.size == 16 and g.unit_channels == 2
    conv = next(m for m in g.members if m.name == "stages.0.conv_exp.0")
    assert torch.equal(conv.units, torch.arange(32) % 16)


def test_grouped_convs_pruned_by_whole_groups() -> None:
    model, x, masks = _masks("resnext")
    g = masks["blocks.0.conv1.0"]
    assert g.size == 8 and g.unit_channels == 4  # 8 conv groups of 4 channels
    _decayed(masks, macs=0.5)
    md.export(model, masks)
    conv = model.blocks[0].conv2[0]
    assert conv.groups == conv.in_channels // 4 == conv.out_channels // 4 < 8


def test_literal_split_left_whole_and_export_check_names_group() -> None:
    """Res2Net splits with a size fixed in its code: pruning the split tensor breaks it. The construction check
    leaves it whole; without that check, export refuses and names the group, leaving the model unchanged."""
    model, x, masks = _masks("res2net", verify=False)
    g = masks["blocks.0.conv1.0"]
    assert g.size == 8 and g.unit_channels == 4  # equal chunks of 8: channel i of the 4 chunks is one unit
    plan = md.plan(masks, widths={g.name: 4})
    md.MaskDecay(masks, plan, steps=1, regularizer="hard").step()
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match=r"group\(s\) 'blocks\.0\.conv1\.0' changes the output"):
        md.export(model, masks)
    assert [p.shape for p in model.parameters()] == shapes and masks.attached
    student = md.export(model, masks, verify=False)
    with pytest.raises(RuntimeError):  # the unchecked student is broken: the split sizes in its code no longer fit
        student(x)


def test_attention_left_whole_student_runs() -> None:
    model, x, masks = _masks("attention")
    assert [g.name for g in masks.groups] == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    _decayed(masks)
    student = md.export(model, masks)
    assert student.blocks[0].attn.qkv.out_features == 96
    assert student.blocks[0].mlp[0].out_features < 128


def test_grouped_convs_with_unequal_group_widths() -> None:
    """Conv groups of 4 input and 8 output channels, then 8 and 4: the three convs share one group of 4 conv groups."""
    from tests.nets import finish
    torch.manual_seed(0)
    model = finish(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))
    x = torch.randn(2, 3, 16, 16)
    masks = md.ChannelMasks(model, x, ignored_layers=[model[-1]])
    assert [(g.name, g.size, g.unit_channels) for g in masks.groups] == [("0", 4, 4)]
    _decayed(masks, macs=0.5)
    with torch.no_grad():
        masked = model(x)
    md.export(model, masks)
    assert model[3].groups == model[6].groups == model[3].in_channels // 4 == model[6].in_channels // 8 < 4
    with torch.no_grad():
        assert float((model(x) - masked).abs().max()) <= 1e-4 * float(masked.abs().max())
