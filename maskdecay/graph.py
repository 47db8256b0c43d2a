"""Discovery of coupled channel groups on top of Torch-Pruning's ``DependencyGraph``.

Torch-Pruning traces the model through autograd and links every layer to the layers whose channels must be pruned
together with it. We reuse that graph, and walk it ourselves so that we can

* see couplings Torch-Pruning cannot: ``PixelShuffle``/``PixelUnshuffle`` change the channel count (``r*r`` conv
  channels make one output channel), which Torch-Pruning treats as an element-wise op (its issues #98, #420);
* keep *every* (channel, root channel) pair. Channels that must go together (the ``r*r`` channels behind one pixel-shuffle
  output, the channels of one ``GroupNorm`` group) are merged into one *unit*, and a unit carries one mask value.

The result is a list of :class:`Group` objects: one mask vector each, with the member layers and, for every member,
which of its channels belong to which unit.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping

from .macs import to_model_device

log = logging.getLogger(__name__)

#: Per-channel layers whose output the mask may follow (mask after the norm, so the norm cannot undo it).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
#: Layer types a group may contain. Anything else (LayerNorm over channels, attention, LSTM...) makes the group unprunable.
SUPPORTED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.PReLU) + NORM_TYPES


@dataclass
class Member:
    """One layer of a group, with the channels (``idxs``) of that layer that the group owns.

    ``role`` is ``"out"`` when the layer produces the group's channels (conv/linear output channels, norm layers,
    depthwise convs) and ``"in"`` when it consumes them (input channels of the next conv/linear).
    ``units[i]`` is the unit (mask entry) of channel ``idxs[i]``.
    """

    name: str
    module: nn.Module
    role: str
    handler: Callable
    idxs: torch.Tensor
    units: torch.Tensor


@dataclass
class Group:
    """Channels that must be kept or removed together, one mask value per unit.

    Attributes:
        name: name of the root layer (the first layer, in module order, that produces these channels).
        size: number of units (mask entries). A unit is one channel, except where a coupling ties several channels
            together: ``r*r`` conv channels feeding one ``PixelShuffle(r)`` channel, the channels of a ``GroupNorm`` group.
        members: every layer touched when a unit is removed.
        unit_channels: channels of the root layer per unit.
        macs_per_unit: MACs (for the example inputs) that removing one unit saves, all else kept; set by
            :class:`~maskdecay.ChannelMasks`.
    """

    name: str
    size: int
    members: list[Member]
    unit_channels: int = 1
    macs_per_unit: float = 0.0
    index: int = 0
    mask_points: list[Member] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Names of the member layers (each once)."""
        return list(dict.fromkeys(m.name for m in self.members))

    def __repr__(self) -> str:
        return (f"Group({self.name!r}, size={self.size}, unit_channels={self.unit_channels}, "
                f"layers={len(self.layers)}, macs_per_unit={self.macs_per_unit:.3g})")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _shuffle_factor(node: Any) -> tuple[int, bool] | None:
    """``(r, upscale)`` when the traced node is a pixel (un)shuffle, else None."""
    grad_fn = node.grad_fn
    if grad_fn is None or not hasattr(grad_fn, "name"):
        return None
    name = grad_fn.name().lower()
    if "pixelshuffle" in name:
        return int(grad_fn._saved_upscale_factor), True
    if "pixelunshuffle" in name:
        return int(grad_fn._saved_downscale_factor), False
    return None


def _expand(stride: int) -> Callable[[list], list]:
    """Channel c of the narrow side is channels c*stride .. c*stride+stride-1 of the wide side."""
    def fn(idxs: list) -> list:
        return [_helpers._HybridIndex(idx=i.idx * stride + k, root_idx=i.root_idx) for i in idxs for k in range(stride)]
    return fn


def _contract(stride: int) -> Callable[[list], list]:
    """Channel k of the wide side belongs to channel k // stride of the narrow side."""
    def fn(idxs: list) -> list:
        return [_helpers._HybridIndex(idx=i.idx // stride, root_idx=i.root_idx) for i in idxs]
    return fn


def _shuffle_mappings(graph: tp.DependencyGraph) -> dict[int, Callable[[list], list]]:
    """Index mappings, keyed by ``id(dependency)``, for the dependencies that cross a pixel (un)shuffle."""
    extra: dict[int, Callable[[list], list]] = {}
    for node in graph.module2node.values():
        info = _shuffle_factor(node)
        if info is None:
            continue
        r, upscale = info
        stride = r * r
        # PixelShuffle: input is the wide side (C*r*r), output the narrow one; PixelUnshuffle the reverse.
        towards_node, from_node = (_contract(stride), _expand(stride)) if upscale else (_expand(stride), _contract(stride))
        for inp in node.inputs:
            for dep in inp.dependencies:
                if dep.target is node:
                    extra[id(dep)] = towards_node
            for dep in node.dependencies:
                if dep.target is inp:
                    extra[id(dep)] = from_node
    return extra


class _ConcatSizes(TorchFunctionMode):
    """Records the true input sizes of every ``torch.cat`` during tracing.

    Torch-Pruning infers them by walking back to the nearest layer, which is wrong behind a pixel shuffle (it would
    count the ``C*r*r`` conv channels instead of the ``C`` shuffled ones).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[Any, list[int]] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.cat, torch.concat, torch.concatenate) and isinstance(out, torch.Tensor) \
                and out.grad_fn is not None:
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            self.sizes[out.grad_fn] = [int(t.shape[dim]) for t in tensors]
        return out


def _walk(graph: tp.DependencyGraph, module: nn.Module, handler: Callable, n: int,
          extra: dict[int, Callable[[list], list]]) -> dict[tuple[Any, Callable], dict[int, set[int]]]:
    """All (node, handler) reached from pruning ``n`` channels of ``module``, with {idx: {root idxs}} for each."""
    root = graph.module2node[module]
    seen: dict[tuple[Any, Callable], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(n)]
    for i in range(n):
        seen[(root, handler)][i].add(i)
    stack = [(root, handler, start)]
    while stack:
        node, fn, idxs = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            new = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if id(dep) in extra:
                new = extra[id(dep)](new)
            record = seen[(dep.target, dep.handler)]
            fresh = [i for i in new if i.root_idx not in record[i.idx]]
            if not fresh:
                continue
            for i in fresh:
                record[i.idx].add(i.root_idx)
            stack.append((dep.target, dep.handler, fresh))
    return seen


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def find_groups(model: nn.Module, example_inputs: Any, ignored_layers: Sequence[nn.Module] = (),
                forward_fn: Callable | None = None, output_transform: Callable | None = None) -> list[Group]:
    """Trace ``model`` and return its prunable channel groups.

    A group is left out (and logged at INFO level) when one of its layers is ignored, when it reaches the model's
    output (pruning it would change the output shape), or when it holds a layer we cannot shrink exactly
    (grouped non-depthwise convs, LayerNorm over channels, attention, recurrent layers, bare parameters).
    """
    was_training = model.training
    example_inputs = to_model_device(example_inputs, model)
    with torch.enable_grad(), _ConcatSizes() as cat_sizes:
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs, forward_fn=forward_fn, output_transform=output_transform, verbose=False)
    model.train(was_training)
    for node in graph.module2node.values():
        if node.type == ops.OPTYPE.CONCAT and node.grad_fn in cat_sizes.sizes:
            node.module.concat_sizes = cat_sizes.sizes[node.grad_fn]
    index_mapping.update_index_mapping(graph)
    extra = _shuffle_mappings(graph)
    names = {m: n for n, m in model.named_modules()}
    ignored = {id(sub) for layer in ignored_layers for sub in layer.modules()}
    covered: set[int] = set()
    groups: list[Group] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or module not in graph.module2node:
            continue
        if id(module) in ignored or id(module) in covered:
            continue
        pruner = graph.get_pruner_of_module(module)
        handler = tp.prune_depthwise_conv_out_channels if _is_depthwise(module) else pruner.prune_out_channels
        n_out = pruner.get_out_channels(module)
        seen = _walk(graph, module, handler, n_out, extra)
        for node, fn in seen:
            if node.module in names and graph.is_out_channel_pruning_fn(fn):
                covered.add(id(node.module))
        group = _build_group(name, seen, names, ignored, graph)
        if group is not None:
            group.index = len(groups)
            groups.append(group)
    return groups


def _reject_reason(seen: dict, names: dict, ignored: set[int], graph: tp.DependencyGraph) -> str | None:
    for node, fn in seen:
        module = node.module
        carries_group = module not in names or graph.is_out_channel_pruning_fn(fn)
        if isinstance(module, ops._OutputOp) or (carries_group and not node.outputs):
            return "reaches the model output"
        if isinstance(module, nn.Parameter):
            return "holds a bare nn.Parameter"
        if module not in names:
            continue
        if id(module) in ignored and graph.is_out_channel_pruning_fn(fn):
            return f"holds the output channels of ignored layer {names[module]!r}"
        if not isinstance(module, SUPPORTED_TYPES):
            return f"holds {type(module).__name__} {names[module]!r}, which cannot be shrunk exactly"
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module):
            return f"holds grouped conv {names[module]!r}"
    return None


def _build_group(name: str, seen: dict, names: dict, ignored: set[int], graph: tp.DependencyGraph) -> Group | None:
    reason = _reject_reason(seen, names, ignored, graph)
    if reason is not None:
        log.info("channels of %r are not prunable: the group %s", name, reason)
        return None
    uf = _UnionFind()
    real = [(node, fn, rec) for (node, fn), rec in seen.items() if node.module in names]
    for (node, fn), rec in seen.items():
        for roots in rec.values():
            first = min(roots)
            for r in roots:
                uf.union(first, r)
    for node, fn, rec in real:
        if isinstance(node.module, nn.GroupNorm):
            per = node.module.num_channels // node.module.num_groups
            by_gn_group: dict[int, list[int]] = defaultdict(list)
            for idx, roots in rec.items():
                by_gn_group[idx // per].extend(roots)
            for roots in by_gn_group.values():
                for r in roots:
                    uf.union(roots[0], r)
    root_rec = next(rec for (node, fn), rec in seen.items() if names.get(node.module) == name)
    comps = sorted({uf.find(r) for r in root_rec})
    unit_of = {c: u for u, c in enumerate(comps)}
    members = []
    for node, fn, rec in real:
        idxs = sorted(rec)
        role = "out" if graph.is_out_channel_pruning_fn(fn) else "in"
        units = [unit_of[uf.find(min(rec[i]))] for i in idxs]
        members.append(Member(names[node.module], node.module, role, fn,
                              torch.tensor(idxs, dtype=torch.long), torch.tensor(units, dtype=torch.long)))
    order = {n: i for i, n in enumerate(names.values())}
    members.sort(key=lambda m: order[m.name])
    group = Group(name=name, size=len(comps), members=members, unit_channels=len(root_rec) // len(comps))
    group.mask_points = _mask_points(members, graph)
    return group


def _mask_points(members: list[Member], graph: tp.DependencyGraph) -> list[Member]:
    """Members whose output the mask multiplies.

    Every producer of the group's channels is masked, so that a zero mask zeroes the channel wherever it is read.
    PReLU is never a mask point: it is positively homogeneous, so the mask of the layer before it suffices.
    A producer whose only consumer is a norm layer of the same group is skipped: the mask goes after that norm
    (a norm would undo a mask placed before it).
    """
    producers = [m for m in members if m.role == "out" and not isinstance(m.module, nn.PReLU)]
    masked_norms = {id(m.module) for m in producers if isinstance(m.module, NORM_TYPES)}
    points = []
    for m in producers:
        outputs = graph.module2node[m.module].outputs
        if len(outputs) == 1 and id(outputs[0].module) in masked_norms:
            continue
        points.append(m)
    return points


def unique_modules(groups: Iterable[Group]) -> list[nn.Module]:
    """Every real layer of the groups, once, in first-seen order."""
    out: dict[int, nn.Module] = {}
    for g in groups:
        for m in g.members:
            out.setdefault(id(m.module), m.module)
    return list(out.values())
