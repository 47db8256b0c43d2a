"""Regularizers, schedules and MaskDecay: each regularizer's defining property, AMP, resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import maskdecay as md
from maskdecay import schedules
from tests.nets import ALL_NETS, example_input, resnet_cifar


def _setup(regularizer, steps: int = 30, schedule: str = "cosine", mask_lr: float = 0.05):
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8).train()
    teacher = copy.deepcopy(model).eval()
    x = torch.randn(8, 3, 32, 32)
    masks = md.ChannelMasks(model, x[:1])
    plan = md.plan(masks, macs=0.5)
    reg = {} if regularizer is None else {"regularizer": regularizer}  # None: the default
    decay = md.MaskDecay(masks, plan, steps=steps, schedule=schedule, mask_lr=mask_lr, record_every=1, **reg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, teacher, x, masks, decay, opt


def _train_step(model, teacher, x, decay, opt, autocast: bool = False) -> float:
    with torch.no_grad():
        target = teacher(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        loss = F.mse_loss(out.float(), target) + decay.penalty()
    opt.zero_grad()
    loss.backward()
    opt.step()
    decay.step()
    return float(loss.detach())


def _removed_kept(masks, decay):
    rem = torch.cat([v.detach()[r] for v, r in zip(masks.values, decay.removed_masks)])
    kept = torch.cat([v.detach()[~r] for v, r in zip(masks.values, decay.removed_masks)])
    return rem, kept


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp", "step"])
def test_sparsity_loss_zero_by_n_kept_untouched(schedule: str) -> None:
    model, teacher, x, masks, decay, opt = _setup(md.SparsityLoss(strength=0.05), steps=24, schedule=schedule)
    while not decay.done:
        _train_step(model, teacher, x, decay, opt)
        rem, kept = _removed_kept(masks, decay)
        assert bool((rem >= 0).all()) and bool((rem <= decay.ceiling + 1e-7).all())
        assert bool((kept == 1).all())
    rem, _ = _removed_kept(masks, decay)
    assert bool((rem == 0).all())
    assert decay.history["cut_jump"] == 0.0  # nothing left to cut: no final jump


def test_sparsity_pull_grows_near_zero_and_zeroes_masks_early() -> None:
    model, teacher, x, masks, decay, opt = _setup(md.SparsityLoss(strength=5.0), steps=40, schedule="linear")
    for _ in range(30):
        _train_step(model, teacher, x, decay, opt)
    rem, _ = _removed_kept(masks, decay)
    assert decay.ceiling > 0.2
    assert float((rem == 0).float().mean()) > 0.5  # most removed masks hit exactly 0 well before the ceiling does
    m = torch.tensor([0.5, 0.05, 0.005], requires_grad=True)
    torch.log1p(m / 0.05).sum().backward()
    assert m.grad[2] > m.grad[1] > m.grad[0]  # the pull grows as the mask shrinks (L2's vanishes)


@pytest.mark.parametrize("reg", ["hard", None])  # None: the default regularizer, hard decay
def test_hard_follows_schedule_exactly(reg: str | None) -> None:
    model, teacher, x, masks, decay, opt = _setup(reg, steps=10, schedule="linear")
    for t in range(1, 11):
        _train_step(model, teacher, x, decay, opt)
        rem, kept = _removed_kept(masks, decay)
        assert torch.allclose(rem, torch.full_like(rem, max(0.0, 1 - t / 10)))
        assert bool((kept == 1).all())


def test_l2_never_reaches_zero_then_cut_jumps() -> None:
    model, teacher, x, masks, decay, opt = _setup(md.L2(strength=0.5), steps=20)
    for _ in range(19):
        _train_step(model, teacher, x, decay, opt)
    rem, _ = _removed_kept(masks, decay)
    assert bool((rem.abs() > 0).all())
    _train_step(model, teacher, x, decay, opt)
    rem, _ = _removed_kept(masks, decay)
    assert decay.done and bool((rem == 0).all())
    assert decay.history["cut_jump"] > 0


def test_l1_shrinks_kept_masks_too() -> None:
    model, teacher, x, masks, decay, opt = _setup(md.L1(strength=0.05), steps=20)
    while not decay.done:
        _train_step(model, teacher, x, decay, opt)
    rem, kept = _removed_kept(masks, decay)
    assert float(kept.mean()) < 0.99  # L1 pulls important channels too
    assert bool((rem == 0).all()) and decay.history["cut_jump"] > 0


def test_mask_grad_clip_bounds_masks_under_a_huge_loss_scale() -> None:
    """An image-codec-sized loss (x 1e6) makes plain SGD on L1 masks explode; mask_grad_clip bounds every step."""
    def run(clip):
        model, teacher, x, masks, _, opt = _setup("l1", steps=10)
        decay = md.MaskDecay(masks, md.plan(masks, macs=0.5), steps=10, regularizer="l1", mask_grad_clip=clip)
        largest = 0.0
        for _ in range(5):
            with torch.no_grad():
                target = teacher(x) + 1.0
            loss = 1e6 * F.mse_loss(model(x), target) + decay.penalty()
            opt.zero_grad()
            loss.backward()
            decay.step()  # masks only (no weight step): the change of each mask is the update itself
            largest = max(largest, float(torch.cat([v.detach() for v in masks.values]).sub(1).abs().max()))
        return largest, decay
    free, _ = run(None)
    clipped, decay = run(1.0)
    assert free > 100.0  # the unclipped SGD step follows the 1e6-scaled gradient
    assert clipped <= 5 * 0.05 * 1.0 + 1e-6  # at most mask_lr * clip per step, 5 steps
    assert decay.history["mask_grad_clip"] == 1.0
    with pytest.raises(ValueError, match="mask_grad_clip"):
        md.MaskDecay(decay.masks, decay.plan, steps=3, mask_grad_clip=0)


def test_bn_scale_l1_shrinks_norm_scales_not_masks() -> None:
    model, teacher, x, masks, decay, opt = _setup(md.BNScaleL1(strength=1e-2), steps=10)
    before = sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for _ in range(9):
        _train_step(model, teacher, x, decay, opt)
        assert all(bool((v == 1).all()) for v in masks.values)
    after = sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert after < before


def test_group_lasso_gradient_reaches_all_member_weights() -> None:
    model, teacher, x, masks, decay, opt = _setup(md.GroupLasso(strength=1.0), steps=10)
    decay.penalty().backward()
    g = masks.groups[0]
    for m in g.members:
        assert m.module.weight.grad is not None and float(m.module.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("reg", ["sparsity", "hard", "l1", "l2", "bn", "group_lasso"])
def test_bf16_autocast(reg: str) -> None:
    model, teacher, x, masks, decay, opt = _setup(reg, steps=6)
    while not decay.done:
        loss = _train_step(model, teacher, x, decay, opt, autocast=True)
        assert loss == loss  # not NaN
    rem, _ = _removed_kept(masks, decay)
    assert bool((rem == 0).all())


def test_resume_mid_decay_gives_same_trajectory() -> None:
    model, teacher, x, masks, decay, opt = _setup("sparsity", steps=12)
    for _ in range(12):
        _train_step(model, teacher, x, decay, opt)
    reference = masks.state_dict()

    model, teacher, x, masks, decay, opt = _setup("sparsity", steps=12)
    for _ in range(5):
        _train_step(model, teacher, x, decay, opt)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(decay.state_dict()))

    model2, teacher2, x2, masks2, decay2, opt2 = _setup("sparsity", steps=12)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    decay2.load_state_dict(saved[2])
    assert decay2.t == 5
    for _ in range(7):
        _train_step(model2, teacher, x, decay2, opt2)
    for name, v in masks2.state_dict().items():
        assert torch.equal(v, reference[name])
    assert decay2.history["step"][-1] == 12


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_schedules_go_from_one_to_zero(name: str) -> None:
    f = schedules.get_schedule(name)
    vals = [schedules.evaluate(f, t, 20) for t in range(21)]
    assert vals[0] == 1.0 and vals[-1] == 0.0
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_bad_schedule_and_regularizer() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.get_schedule("nope")
    with pytest.raises(ValueError, match="must return values in"):
        schedules.evaluate(lambda t, n: 2.0, 1, 10)
    with pytest.raises(ValueError, match="unknown regularizer"):
        md.regularizers.get_regularizer("l3")


@pytest.mark.parametrize("name", sorted(ALL_NETS))
def test_folded_masks_match_output_multiply(name, monkeypatch):
    """Masks folded into conv/norm parameters give the outputs and gradients of multiplying the activations."""
    import maskdecay.masks as mm

    results = []
    for fold in (True, False):
        torch.manual_seed(0)
        model = ALL_NETS[name][0]().train()
        x = example_input(name, batch=2)
        if not fold:
            monkeypatch.setattr(mm, "_fold_dims", lambda module: None)
        masks = md.ChannelMasks(model, x[:1])
        with torch.no_grad():
            for v in masks.values:
                v.uniform_(0.0, 1.5)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), [v.grad.clone() for v in masks.values],
                        [p.grad.clone() for p in model.parameters()], copy.deepcopy(model.state_dict())))
    (o1, m1, p1, s1), (o2, m2, p2, s2) = results
    assert torch.allclose(o1, o2, rtol=1e-4, atol=1e-5)
    for a, b in zip(m1 + p1, m2 + p2):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    assert s1.keys() == s2.keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host synchronisation is a GPU matter)")
@pytest.mark.parametrize("reg", ["sparsity", "hard", "l1", "l2", "bn", "group_lasso"])
def test_decay_steps_do_not_synchronise_with_the_host(reg: str) -> None:
    import torch.nn as nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    masks = md.ChannelMasks(model, x, ignored_layers=[model[3]])
    decay = md.MaskDecay(masks, md.plan(masks, widths={masks.groups[0].name: 4}), steps=1000, regularizer=reg)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # steps between two history records
            (model(x).square().mean() + decay.penalty()).backward()
            decay.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@torch.no_grad()
def _shrink(reg, masks, g, units: list[int]) -> None:
    """Scale down, for ``units`` of group ``g``, the quantity ``reg`` penalises (masks, norm scales, or every weight
    producing or reading the unit)."""
    if isinstance(reg, (md.L1, md.L2, md.SparsityLoss)):
        masks.values[g.index][units] = 1e-3
        return
    for m in g.members:
        w = getattr(m.module, "weight", None)
        if w is None or (isinstance(reg, md.BNScaleL1) and w.dim() != 1):
            continue
        dim = 0 if (w.dim() == 1 or m.role == "out" or getattr(m.module, "groups", 1) > 1) else 1
        sel = torch.isin(m.units, torch.tensor(units))
        w.data.transpose(0, dim)[m.idxs[sel]] *= 1e-3


@pytest.mark.parametrize("reg", [md.L1(0.05), md.L2(0.05), md.BNScaleL1(0.05), md.GroupLasso(0.05),
                                 md.SparsityLoss(0.05, scope="all")])
def test_select_at_cut_removes_what_the_penalty_shrank(reg) -> None:
    """``select="cut"``: the plan's widths, the units with the smallest penalised quantity; the student is exact."""
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8).train()
    x = torch.randn(8, 3, 32, 32)
    masks = md.ChannelMasks(model, x[:1])
    plan = md.plan(masks, macs=0.5)
    decay = md.MaskDecay(masks, plan, steps=4, regularizer=reg, select="cut")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    while not decay.done:
        loss = model(x).pow(2).mean() + decay.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if decay.t == 3:  # make the plan's kept units the ones the penalty shrank most
            for g in masks.groups:
                _shrink(reg, masks, g, plan.keep[g.name])
        decay.step()
    assert decay.plan.widths == plan.widths and masks.plan is decay.plan
    assert decay.history["select"] == "cut" and decay.history["reselected"] > 0.5
    for g in masks.groups:
        scores = reg.unit_scores(g.index)
        removed, kept = decay.plan.removed(g.name), decay.plan.keep[g.name]
        if removed and scores is not None:
            assert float(scores[removed].max()) <= float(scores[kept].min()) + 1e-12, g.name
    model.eval()
    with torch.no_grad():
        ref = model(x)
        student = md.export(model, masks)
        assert torch.allclose(student(x), ref, atol=1e-5)
    assert md.count_macs(student, x[:1]) == pytest.approx(plan.macs, rel=1e-6)


def test_sparsity_loss_on_every_unit() -> None:
    """``scope="all"``: the log-sum pull acts on kept masks too, without a ceiling (that needs the plan's set)."""
    with pytest.raises(ValueError, match="needs scope='removed'"):
        md.SparsityLoss(scope="all", ceiling=True)
    assert md.SparsityLoss().ceiling and not md.SparsityLoss(scope="all").ceiling
    model, teacher, x, masks, decay, opt = _setup(md.SparsityLoss(strength=0.5, scope="all"), steps=6)
    while decay.t < 5:
        _train_step(model, teacher, x, decay, opt)
    kept = torch.cat([v.detach()[~r] for v, r in zip(masks.values, decay.removed_masks)])
    assert float(kept.max()) < 1.0  # pulled, unlike the default scope's kept masks
    _train_step(model, teacher, x, decay, opt)
    assert decay.done and decay.history["cut_jump"] > 0  # no ceiling: what is left of the removed masks is cut


@pytest.mark.parametrize("reg", [md.SparsityLoss(10.0, ceiling=False), md.SparsityLoss(10.0, scope="all")])
def test_strong_sparsity_loss_without_ceiling_stays_at_zero(reg) -> None:
    """Near 0 the pull is strength/eps = 200 per unit of mask: one step of mask_lr=0.05 would move a mask by 10.
    The floor stops it at 0 instead of carrying it across (where |m| would be 10 and the pull would bounce it)."""
    model, teacher, x, masks, decay, opt = _setup(reg, steps=40)
    while decay.t < 39:
        _train_step(model, teacher, x, decay, opt)
        values = torch.cat([v.detach() for v in masks.values])
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.1
    rem, _ = _removed_kept(masks, decay)
    assert float(rem.mean()) < 0.05  # the pull emptied them (without a ceiling)


def test_select_at_cut_errors_and_resume() -> None:
    model, teacher, x, masks, decay, opt = _setup(md.L1(0.05), steps=3)
    plan0 = decay.plan
    for reg in (md.SparsityLoss(), "hard", md.L1(0.05, scope="removed")):
        with pytest.raises(ValueError, match="select='cut' needs"):
            md.MaskDecay(masks, plan0, steps=3, regularizer=reg, select="cut")
    with pytest.raises(ValueError, match="select must be"):
        md.MaskDecay(masks, plan0, steps=3, select="end")
    decay = md.MaskDecay(masks, plan0, steps=3, regularizer=md.L1(0.05), select="cut")
    while not decay.done:
        _train_step(model, teacher, x, decay, opt)
    state = decay.state_dict()
    again = md.MaskDecay(masks, plan0, steps=3, regularizer=md.L1(0.05), select="cut")
    again.load_state_dict(state)  # a finished decay resumes with the units it chose
    assert again.done and again.plan.keep == decay.plan.keep and masks.plan is again.plan


def test_schedule_within_a_fraction_of_the_phase() -> None:
    fast = schedules.within(0.25, "cosine")
    assert fast.__name__ == "cosine_within_0.25"
    assert [schedules.evaluate(fast, t, 100) for t in (0, 25, 60, 100)] == [1.0, 0.0, 0.0, 0.0]
    assert schedules.evaluate(fast, 10, 100) == pytest.approx(schedules.cosine(10, 25))
    assert schedules.within(1.0, "linear") is schedules.linear
    with pytest.raises(ValueError, match="fraction"):
        schedules.within(0.0)
    model, teacher, x, masks, decay, opt = _setup("hard", steps=8, schedule=fast)
    while not decay.done:
        _train_step(model, teacher, x, decay, opt)
        if decay.t >= 2:  # the removed masks are gone after a quarter of the steps
            assert float(_removed_kept(masks, decay)[0].abs().max()) == 0.0
