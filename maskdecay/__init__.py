"""maskdecay: shrink a trained conv net into a physically smaller one with mask decay.

Typical use::

    import maskdecay as md
    masks = md.ChannelMasks(model, example_inputs, ignored_layers=[model.fc])
    plan = md.plan(masks, macs=0.5)
    decay = md.MaskDecay(masks, plan, steps=2000)  # removed masks follow a cosine to 0 ("hard")
    ...  # loss = task + decay.penalty(); loss.backward(); opt.step(); decay.step()
    student = md.export(model, masks, optimizer=opt)
    md.save_pruned("student.pt", student, plan)

Public names:

* :class:`ChannelMasks`, :class:`Group` -- coupled channel groups (Torch-Pruning's DependencyGraph, extended to
  PixelShuffle and GroupNorm) with one mask per unit.
* :func:`plan`, :class:`Plan` -- which units the student keeps (MAC budget or explicit widths), ranked by an
  importance criterion: :class:`Importance` and :class:`L1Importance`, :class:`L2Importance`, :class:`BNImportance`,
  :class:`TaylorImportance`, by name through :data:`IMPORTANCES` / :func:`get_importance` ("l1", "l2", "bn",
  "taylor"); :func:`group_importance` scores one group.
* :class:`MaskDecay` -- the decay phase; regularizers :class:`SparsityLoss`, :class:`L1`, :class:`L2`,
  :class:`BNScaleL1`, :class:`GroupLasso`, :class:`Hard`; schedules in :mod:`maskdecay.schedules`.
* :func:`export` -- physical removal with optimizer-state remapping.
* :func:`save_pruned`, :func:`load_pruned`, :func:`atomic_save` -- checkpoints without pickled modules.
* :func:`profile`, :class:`Report`, :func:`count_macs` -- MACs, params, latency.
* :mod:`maskdecay.plots` -- ``mask_trajectories`` and ``compare``.
"""
from . import plots, schedules
from .checkpoint import atomic_save, load_pruned, save_pruned
from .decay import MaskDecay
from .export import export
from .graph import Group, Member
from .importance import (IMPORTANCES, BNImportance, Importance, L1Importance, L2Importance, TaylorImportance,
                         get_importance, group_importance)
from .macs import count_macs
from .masks import ChannelMasks
from .planning import Plan, plan
from .profiling import Report, profile
from .regularizers import L1, L2, BNScaleL1, GroupLasso, Hard, Regularizer, SparsityLoss

__version__ = "0.1.0"

__all__ = [
    "ChannelMasks", "Group", "Member", "Plan", "plan", "group_importance", "Importance", "L1Importance", "L2Importance",
    "BNImportance", "TaylorImportance", "IMPORTANCES", "get_importance", "MaskDecay", "Regularizer", "SparsityLoss",
    "L1", "L2", "BNScaleL1", "GroupLasso", "Hard", "export", "save_pruned", "load_pruned", "atomic_save", "profile",
    "Report", "count_macs", "plots", "schedules",
]
