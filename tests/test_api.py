"""Export with an optimizer, checkpoints, bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maskdecay as md
from tests.nets import mobilenetv2_tiny, resnet_cifar


def _decayed(model: nn.Module, x: torch.Tensor, steps: int = 2, **kw):
    masks = md.ChannelMasks(model, x[:1], **kw)
    plan = md.plan(masks, macs=0.5)
    decay = md.MaskDecay(masks, plan, steps=steps, regularizer="hard")
    return masks, plan, decay


def test_export_remaps_adam_state_and_training_continues() -> None:
    model = resnet_cifar(8, width=8).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    masks, plan, decay = _decayed(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    while not decay.done:
        loss = F.cross_entropy(model(x), y) + decay.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    conv = model.conv1
    g = masks["conv1"]
    kept = torch.tensor(sorted(plan.keep["conv1"]))
    chans = next(m for m in g.members if m.module is conv and m.role == "out")
    kept_ch = chans.idxs[torch.isin(chans.units, kept)]
    old_state = {k: v.clone() for k, v in opt.state[conv.weight].items()}
    md.export(model, masks, optimizer=opt)
    new_state = opt.state[conv.weight]
    assert conv.weight.shape[0] == len(kept_ch)
    assert torch.equal(new_state["exp_avg"], old_state["exp_avg"][kept_ch])
    assert torch.equal(new_state["exp_avg_sq"], old_state["exp_avg_sq"][kept_ch])
    assert torch.equal(new_state["step"], old_state["step"])
    params = {id(p) for pg in opt.param_groups for p in pg["params"]}
    assert all(id(p) in params for p in model.parameters())
    for _ in range(2):
        before = conv.weight.detach().clone()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert not torch.equal(before, conv.weight)  # pruned parameters really train (Torch-Pruning #120)


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = mobilenetv2_tiny()
    x = torch.randn(2, 3, 32, 32)
    masks, plan, decay = _decayed(model, x)
    decay.step()
    decay.step()
    student = md.export(model, masks)
    path = tmp_path / "student.pt"
    md.save_pruned(path, student, plan)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "maskdecay-pruned"
    loaded = md.load_pruned(path, mobilenetv2_tiny)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), loaded.eval()(x))
    assert not list(tmp_path.glob(".*tmp"))


def test_load_pruned_rejects_other_files_and_models(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ValueError, match="not a maskdecay"):
        md.load_pruned(bad, mobilenetv2_tiny)
    model = resnet_cifar(8, width=8)
    x = torch.randn(1, 3, 32, 32)
    masks, plan, decay = _decayed(model, x, steps=1)
    decay.step()
    path = tmp_path / "r.pt"
    md.save_pruned(path, md.export(model, masks), plan)
    with pytest.raises(ValueError, match="another model"):
        md.load_pruned(path, lambda: resnet_cifar(8, width=16))


def test_no_prunable_layer() -> None:
    with pytest.raises(ValueError, match="no prunable channel group"):
        md.ChannelMasks(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))


def test_budget_cannot_be_met() -> None:
    model = resnet_cifar(8, width=8)
    masks = md.ChannelMasks(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="cannot be met"):
        md.plan(masks, macs=0.001)


def test_unknown_group_and_bad_width() -> None:
    model = resnet_cifar(8, width=8)
    masks = md.ChannelMasks(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        md.plan(masks, widths={"nope": 3})
    with pytest.raises(ValueError, match="must be an integer"):
        md.plan(masks, widths={masks.groups[0].name: 0})


def test_plan_for_another_model() -> None:
    a = md.ChannelMasks(resnet_cifar(8, width=8), torch.randn(1, 3, 32, 32))
    b = md.ChannelMasks(mobilenetv2_tiny(), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="another model"):
        md.MaskDecay(b, md.plan(a, macs=0.5), steps=3)


def test_ignored_classifier_keeps_last_stage_prunable() -> None:
    model = resnet_cifar(8, width=8)
    masks = md.ChannelMasks(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.fc])
    assert any("fc" in g.layers for g in masks.groups)  # fc's inputs shrink with the last stage
    assert all(not any(m.name == "fc" and m.role == "out" for m in g.members) for g in masks.groups)


def test_export_before_decay_is_done_is_refused() -> None:
    model = resnet_cifar(8, width=8)
    masks, plan, decay = _decayed(model, torch.randn(1, 3, 32, 32), steps=5)
    decay.step()
    with pytest.raises(ValueError, match="not zero yet"):
        md.export(model, masks)


def test_example_inputs_follow_the_model_device() -> None:
    """Inputs in any container reach the model's device; non-tensors and namedtuples survive."""
    from collections import namedtuple

    from maskdecay.macs import to_model_device

    P = namedtuple("P", "x k")
    model = nn.Linear(2, 2).to(torch.float64)
    x = torch.ones(1, 2)
    out = to_model_device({"a": (x, [x, 3]), "b": P(x, "s")}, model)
    assert isinstance(out["a"], tuple) and isinstance(out["a"][1], list) and out["a"][1][1] == 3
    assert isinstance(out["b"], P) and out["b"].k == "s" and out["a"][0] is x  # same device: no copy
    assert to_model_device(x, nn.ReLU()) is x  # no parameters: unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_masks_on_a_gpu_model_with_cpu_example_inputs() -> None:
    """A model already on the GPU is traced with example inputs built on the CPU (they are moved)."""
    model = resnet_cifar(8, width=8).cuda().train()
    masks = md.ChannelMasks(model, torch.randn(1, 3, 32, 32))
    plan = md.plan(masks, macs=0.5)
    assert plan.macs < masks.teacher_macs and md.count_macs(model, torch.randn(1, 3, 32, 32)) > 0


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_save_gives_plain_open_permissions(tmp_path, umask: int) -> None:
    import os
    import stat

    old = os.umask(umask)
    try:
        md.atomic_save({"a": 1}, tmp_path / "x.pt")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "x.pt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
