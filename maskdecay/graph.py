"""Discovery of coupled channel groups on top of Torch-Pruning's ``DependencyGraph``.

Torch-Pruning traces the model through autograd and links every layer to the layers whose channels must be pruned
together with it. We reuse that graph but map its edges ourselves from the shapes recorded while tracing
(:func:`_edge_maps`: cat, split/chunk, pixel (un)shuffle, flatten, broadcasts), stop at ops whose channel layout we
cannot map, and keep *every* (channel, root channel) pair. Channels that must go together (the ``r*r`` channels behind
one pixel-shuffle output, the channels of one ``GroupNorm`` group, channel i of equal chunks, the channels of one conv
group of a grouped conv) are merged into one *unit*, and a unit carries one mask value.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers, ops

from .macs import to_model_device

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


def _find(parent: dict[int, int], a: int) -> int:
    """Union-find root of ``a`` (the smallest member of its set), with path halving."""
    while parent.setdefault(a, a) != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def _chdim(rank: int) -> int:
    """The channel dim of a tensor of this rank: last for token tensors ``(B, N, C)`` (linear layers), else 1."""
    return 2 if rank == 3 else min(1, rank - 1)


def _channels(shape: tuple) -> int | None:
    return shape[_chdim(len(shape))] if len(shape) else None


class _OpRecords(TorchFunctionMode):
    """Records ``{grad_fn: (op name, input shapes, output shapes)}`` for every op run while tracing (Torch-Pruning
    infers channel counts from the nearest layer, maps split outputs by graph order, and takes unknown ops such as
    transposes or reshapes into heads for element-wise ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[Any, tuple[str, list[tuple], list[tuple]]] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        fn = outs[0].grad_fn if outs and isinstance(outs[0], torch.Tensor) else None
        if fn is not None and fn not in self.ops:  # the first op with this grad_fn (dropout in eval returns its input)
            flat = [t for a in list(args) + list((kwargs or {}).values())
                    for t in (a if isinstance(a, (list, tuple)) else [a])]
            self.ops[fn] = (getattr(func, "__name__", str(func)),
                            [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)],
                            [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)])
        return out


def _map(shift: int, lo: int = 0, hi: float = math.inf, expand: int = 1, contract: int = 1) -> Callable:
    """Index mapping: keep indices in ``[lo, hi)``, subtract ``lo``, narrow (channel c becomes ``c // contract``),
    widen (channel c becomes ``c*expand .. c*expand+expand-1``), add ``shift``."""
    def fn(idxs: list) -> list:
        return [_helpers._HybridIndex(idx=(i.idx - lo) // contract * expand + k + shift, root_idx=i.root_idx)
                for i in idxs if lo <= i.idx < hi for k in range(expand)]
    return fn


def _is_op(node: Any) -> bool:
    """Whether the node is a traced op (cat, view, add...) rather than a layer with a pruner of its own."""
    return type(node.module).__module__ == ops.__name__


def _edge_maps(graph: tp.DependencyGraph, records: dict) -> tuple[dict[int, Callable], dict[Any, str]]:
    """Index mappings for every dependency, keyed by ``id(dependency)``, and the nodes no group may cross.

    Every edge (producer -> consumer) is mapped from the recorded shapes: the chunk a split output is, the offset of
    each input of a cat (by position, so an input used twice is mapped twice), ``r*r`` channels per pixel-shuffle
    channel, the spatial stride of a flatten before a linear layer; an input broadcast along the channels (one channel
    against many) couples nothing. An op that moves, splits or merges the channel dim in any other way (reshape into
    heads, channel shuffle, permute, reduction over channels) is a barrier: a group reaching it is left unpruned.
    """
    maps: dict[int, Callable] = {}
    barriers: dict[Any, str] = {}
    sizes: dict[Any, list[int]] = {}  # cat inputs / split outputs along the channel dim
    scale: dict[Any, tuple[int, int]] = {}  # (expand, contract) from input to output channels
    for node in graph.module2node.values():
        name, ins, outs = records.get(node.grad_fn, ("", [], []))
        if not ins or not outs or not _is_op(node):
            continue
        a, b = ins[0], outs[0]
        if node.type in (ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND):
            cat = node.type == ops.OPTYPE.CONCAT
            parts, whole = (ins, b) if cat else (outs, a)
            dim = _chdim(len(whole))
            if any(len(p) != len(whole) for p in parts) or len(ins) < len(node.grad_fn.next_functions) and cat:
                barriers[node] = f"{name} {a} -> {b}"  # unbind / stack (or a cat whose inputs were not recorded)
            elif len(parts) == 1 or any(p[dim] != whole[dim] for p in parts):
                sizes[node] = node.module.split_sizes = [p[dim] for p in parts]
        elif "pixel" in name:
            scale[node] = (1, a[1] // b[1]) if a[1] > b[1] else (b[1] // a[1], 1)
        elif len(b) == 2 and len(a) >= 4 and b[1] == math.prod(a[1:]):  # flatten before a linear layer
            scale[node] = (math.prod(a[2:]), 1)
        elif _channels(a) != _channels(b) or (len(a) != len(b) and _chdim(len(a)) != _chdim(len(b))):
            barriers[node] = f"{name} {a} -> {b}"
    for cons in graph.module2node.values():
        info = records.get(cons.grad_fn)
        cat = sizes.get(cons) if cons.type == ops.OPTYPE.CONCAT else None
        e, c = scale.get(cons, (1, 1))
        for prod in dict.fromkeys(cons.inputs):
            nexts = getattr(cons.grad_fn, "next_functions", ())
            if not any(fn is prod.grad_fn for fn, _ in nexts):
                continue  # a layer called twice: its node keeps the first call's grad_fn (Torch-Pruning's mapping)
            parts = sizes.get(prod) if prod.type != ops.OPTYPE.CONCAT else None
            fwd, bwd = [], []
            for k, (fn, nr) in enumerate(nexts):
                if fn is not prod.grad_fn or (_is_op(cons) and info and k < len(info[1]) and info[2]
                                              and _channels(info[1][k]) == 1 < (_channels(info[2][0]) or 1)):
                    continue  # another input, or one broadcast along the channels (no coupling)
                lo, hi = (sum(parts[:nr]), sum(parts[:nr + 1])) if parts else (0, math.inf)
                shift = sum(cat[:k]) if cat else 0
                fwd.append(_map(shift, lo, hi, e, c))
                bwd.append(_map(lo, shift, shift + cat[k] if cat else (hi - lo) * e / c, c, e))
            for dep in prod.dependencies + cons.dependencies:
                if (dep.source, dep.target) in ((prod, cons), (cons, prod)):
                    fns = fwd if dep.target is cons else bwd
                    maps[id(dep)] = lambda idxs, fns=fns: [j for f in fns for j in f(idxs)]
    return maps, barriers


def _walk(graph: tp.DependencyGraph, module: nn.Module, handler: Callable, start: list[int],
          maps: dict[int, Callable], barriers: dict[Any, str]) -> dict[tuple[Any, Callable], dict[int, set[int]]]:
    """All (node, handler) reached from pruning channels ``start`` of ``module``, with {idx: {root idxs}} for each.

    The walk stops at barrier nodes (recorded, not crossed), and crosses a grouped conv from its input channels to
    the output channels of the same conv groups (and back); :func:`_build_group` ties each conv group into one unit.
    """
    root = graph.module2node[module]
    seen: dict[tuple[Any, Callable], dict[int, set[int]]] = {(root, handler): {i: {i} for i in start}}
    stack = [(root, handler, [_helpers._HybridIndex(idx=i, root_idx=i) for i in start])]

    def visit(target: Any, fn: Callable, new: list) -> None:
        record = seen.setdefault((target, fn), {})
        fresh = [i for i in new if i.root_idx not in record.get(i.idx, ())]
        for i in fresh:
            record.setdefault(i.idx, set()).add(i.root_idx)
        if fresh and target not in barriers:
            stack.append((target, fn, fresh))

    while stack:
        node, fn, idxs = stack.pop()
        if _is_grouped(node.module):  # channel j of a conv group <-> the channels k == j (mod min) on the other side
            pr, m = graph.get_pruner_of_module(node.module), node.module
            a, b, to_out = m.in_channels // m.groups, m.out_channels // m.groups, fn == pr.prune_in_channels
            a, b, n = (a, b, min(a, b)) if to_out else (b, a, min(a, b))
            visit(node, pr.prune_out_channels if to_out else pr.prune_in_channels,
                  [_helpers._HybridIndex(idx=i.idx // a * b + k, root_idx=i.root_idx)
                   for i in idxs for k in range(i.idx % a % n, b, n)])
        for dep in node.dependencies:
            if dep.is_triggered_by(fn):
                new = maps[id(dep)](idxs) if id(dep) in maps else idxs
                if new:
                    visit(dep.target, dep.handler, new)
    return seen


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): pruned by whole conv groups."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m)


def prune_conv_groups(layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Remove whole conv groups from a grouped conv; ``idxs`` are output channels covering whole groups."""
    n = len(idxs) // (layer.out_channels // layer.groups)
    tp.prune_conv_out_channels(layer, idxs)
    layer.in_channels -= n * (layer.in_channels // layer.groups)
    layer.groups -= n
    return layer


def build_graph(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None,
                output_transform: Callable | None = None) -> tuple[tp.DependencyGraph, dict[int, Callable], dict]:
    """Trace ``model`` with Torch-Pruning's ``build_dependency`` minus its last step (``update_index_mapping``, wrong
    or raising on channel shuffles, multi-way splits, reshapes into heads) and map the edges with :func:`_edge_maps`."""
    was_training = model.training
    graph = tp.DependencyGraph()
    graph.verbose, graph.model, graph.ignored_params = False, model, []
    graph._module2name = {m: n for n, m in model.named_modules()}
    graph._param_to_name, graph.unwrapped_parameters = graph._detect_unwrapped_parameters(None)
    with torch.enable_grad(), _OpRecords() as records:
        graph.module2node = graph._trace(model, to_model_device(example_inputs, model), forward_fn, output_transform)
    model.train(was_training)
    graph._build_dependency(graph.module2node)
    return (graph, *_edge_maps(graph, records.ops))


def find_groups(model: nn.Module, example_inputs: Any, ignored_layers: Sequence[nn.Module] = (),
                forward_fn: Callable | None = None,
                output_transform: Callable | None = None) -> tuple[list[Group], dict[str, str]]:
    """Trace ``model`` and return its prunable channel groups and ``{layer: reason}`` for the layers left whole.

    A group is left out when one of its layers is ignored, when it reaches the model's output (pruning it would
    change the output shape), when it holds a layer we cannot shrink exactly (LayerNorm over channels, attention,
    recurrent layers, bare parameters) or when it crosses an op whose channel layout we cannot map (see
    :func:`_edge_maps`). Every conv/linear layer whose output channels are in no group is listed with the reason.
    """
    graph, maps, barriers = build_graph(model, example_inputs, forward_fn, output_transform)
    names = {m: n for n, m in model.named_modules()}
    ignored = {id(sub) for layer in ignored_layers for sub in layer.modules()}
    unpruned: dict[str, str] = {}
    covered: dict[int, set[int]] = defaultdict(set)
    groups: list[Group] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if id(module) in ignored or module not in graph.module2node:
            unpruned[name] = "ignored" if id(module) in ignored else "not called in the traced forward pass"
            continue
        pruner = graph.get_pruner_of_module(module)
        start = [i for i in range(pruner.get_out_channels(module)) if i not in covered[id(module)]]
        if not start:
            continue
        handler = tp.prune_depthwise_conv_out_channels if _is_depthwise(module) else pruner.prune_out_channels
        seen = _walk(graph, module, handler, start, maps, barriers)
        reason = _reject_reason(seen, names, ignored, graph, barriers)
        for (node, fn), rec in seen.items():
            if rec and node.module in names and graph.is_out_channel_pruning_fn(fn):
                covered[id(node.module)].update(rec)
                if reason is not None and isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)):
                    unpruned.setdefault(names[node.module], f"its group {reason}")
        if reason is None:
            groups.append(_build_group(name, seen, names, graph))
    return groups, unpruned


def _reject_reason(seen: dict, names: dict, ignored: set[int], graph: tp.DependencyGraph,
                   barriers: dict) -> str | None:
    for (node, fn), rec in seen.items():
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
        pruner = graph.get_pruner_of_module(module)
        n = (pruner.get_out_channels if graph.is_out_channel_pruning_fn(fn) else pruner.get_in_channels)(module)
        if rec and n is not None and max(rec) >= n:
            return f"maps channel {max(rec)} onto {names[module]!r}, which has {n}"
    for node, _ in seen:
        if node in barriers:
            return f"crosses {barriers[node]}, a channel layout maskdecay cannot map"
    return None


def _build_group(name: str, seen: dict, names: dict, graph: tp.DependencyGraph) -> Group:
    parent: dict[int, int] = {}
    real = [(node, fn, rec) for (node, fn), rec in seen.items() if node.module in names and rec]
    for (node, fn), rec in seen.items():  # roots reaching one channel are one unit; so are, in a channel's place,
        sizes, m = getattr(node.module, "split_sizes", None) if node.type == ops.OPTYPE.SPLIT else None, node.module
        if isinstance(m, nn.GroupNorm) or _is_grouped(m):  # the channels of a norm group or conv group
            per = (m.num_channels // m.num_groups if isinstance(m, nn.GroupNorm) else
                   (m.out_channels if graph.is_out_channel_pruning_fn(fn) else m.in_channels) // m.groups)
            key = lambda idx, per=per: idx // per  # noqa: E731
        elif sizes and len(set(sizes)) == 1:  # and channel i of every equal chunk (chunks stay equal)
            key = lambda idx, n=sizes[0]: idx % n  # noqa: E731
        else:
            key = lambda idx: idx  # noqa: E731
        tied: dict[int, list[int]] = defaultdict(list)
        for idx, roots in rec.items():
            tied[key(idx)].extend(roots)
        for roots in tied.values():
            for r in roots:
                ra, rb = _find(parent, roots[0]), _find(parent, r)
                parent[max(ra, rb)] = min(ra, rb)
    root_rec = next(rec for (node, fn), rec in seen.items() if names.get(node.module) == name)
    comps = sorted({_find(parent, r) for r in root_rec})
    unit_of = {c: u for u, c in enumerate(comps)}
    members = []
    for node, fn, rec in real:
        role = "out" if graph.is_out_channel_pruning_fn(fn) else "in"
        if _is_grouped(node.module):
            if role == "in":
                continue  # the output member removes the whole conv groups, inputs included
            fn = prune_conv_groups
        idxs = sorted(rec)
        units = [unit_of[_find(parent, min(rec[i]))] for i in idxs]
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
