"""Importance criteria: pluggable objects with a registry; the names keep working wherever a criterion is asked for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maskdecay as md
from tests.nets import resnet_cifar


@pytest.fixture
def masks() -> md.ChannelMasks:
    return md.ChannelMasks(resnet_cifar(8, width=8), torch.randn(1, 3, 32, 32))


def test_names_map_to_the_registered_classes() -> None:
    assert set(md.IMPORTANCES) == {"l1", "l2", "bn", "taylor"}
    for name, cls in md.IMPORTANCES.items():
        crit = md.get_importance(name)
        assert isinstance(crit, cls) and isinstance(crit, md.Importance) and crit.name == name
    crit = md.L2Importance()
    assert md.get_importance(crit) is crit
    with pytest.raises(ValueError, match="unknown importance 'l3'"):
        md.get_importance("l3")
    with pytest.raises(ValueError, match="must be a name"):
        md.get_importance(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["l1", "l2", "bn"])
def test_a_name_and_its_object_give_the_same_scores_and_plan(masks, name) -> None:
    for g in masks.groups:
        by_name = md.group_importance(g, name)
        assert torch.equal(by_name, md.group_importance(g, md.IMPORTANCES[name]()))
        assert by_name.dtype == torch.float64 and by_name.shape == (g.size,)
        assert by_name.mean().item() == pytest.approx(1.0)
    a, b = md.plan(masks, macs=0.5, importance=name), md.plan(masks, macs=0.5, importance=md.IMPORTANCES[name]())
    assert a.keep == b.keep and a.meta["importance"] == b.meta["importance"] == name


def test_l1_and_l2_rank_differently(masks) -> None:
    g = max(masks.groups, key=lambda g: g.size)
    assert not torch.equal(md.group_importance(g, "l1"), md.group_importance(g, "l2"))


def test_taylor_needs_gradients(masks) -> None:
    with pytest.raises(ValueError, match="needs gradients"):
        md.plan(masks, macs=0.5, importance="taylor")
    model = masks.model
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    assert md.plan(masks, macs=0.5, importance="taylor").meta["importance"] == "taylor"


def test_a_new_criterion_is_a_subclass_or_a_callable(masks) -> None:
    class Reversed(md.Importance):
        """Prefers the units L1 would drop."""

        name = "reversed_l1"

        def scores(self, group: md.Group) -> torch.Tensor:
            return 1.0 / md.L1Importance().scores(group)

    plan = md.plan(masks, macs=0.5, importance=Reversed())
    assert plan.meta["importance"] == "reversed_l1"
    assert plan.keep != md.plan(masks, macs=0.5, importance="l1").keep
    by_fn = md.plan(masks, macs=0.5, importance=lambda g: 1.0 / md.L1Importance().scores(g))
    assert by_fn.keep == plan.keep and by_fn.meta["importance"] == "callable"
    with pytest.raises(ValueError, match="returned 1 scores"):
        md.plan(masks, macs=0.5, importance=lambda g: torch.ones(1))
