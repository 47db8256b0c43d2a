"""Multiply-accumulate counting for conv and linear layers.

Our counter counts the MACs of ``Conv*d``, ``ConvTranspose*d`` and ``Linear`` layers only; norms, activations, additions
and pixel shuffles count as zero (as in most papers; Torch-Pruning's counter also adds norm layers, so its numbers
are slightly higher). The same counter is used by :func:`maskdecay.plan` to hit a budget and by
:func:`maskdecay.profile` to report it, so a plan's predicted MACs equal the exported student's measured MACs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn


def to_model_device(example_inputs: Any, model: nn.Module) -> Any:
    """``example_inputs`` (a tensor, or tensors in tuples/lists/dicts) on the device of the model's parameters.

    Lets a user trace a model that already lives on a GPU with inputs built on the CPU (or the other way round);
    non-tensor values are returned unchanged, and nothing is copied when the devices already agree."""
    device = next((p.device for p in model.parameters()), None)
    if device is None:
        return example_inputs

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, tuple) and hasattr(v, "_fields"):  # namedtuple
            return type(v)(*(move(x) for x in v))
        if isinstance(v, (tuple, list)):
            return type(v)(move(x) for x in v)
        return v
    return move(example_inputs)


def run_model(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None) -> Any:
    """Call the model the way Torch-Pruning does: ``forward_fn``, a dict of kwargs, a tuple of args, or one input.
    Input tensors are moved to the model's device first (:func:`to_model_device`)."""
    example_inputs = to_model_device(example_inputs, model)
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> float:
    """MACs of one call of a conv/linear layer (0 for anything else)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        k = module.weight[0].numel()  # (out/groups) * prod(kernel)
        return float(inputs[0].numel() * k)
    if isinstance(module, nn.modules.conv._ConvNd):
        k = module.weight[0].numel()  # (in/groups) * prod(kernel)
        return float(output.numel() * k)
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    return 0.0


def count_layer_macs(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None) -> dict[str, float]:
    """MACs per named conv/linear layer for one forward pass on ``example_inputs`` (layers called twice add up)."""
    counts: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                counts[name] = counts.get(name, 0.0) + layer_macs(mod, inp, out)
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_model(model, example_inputs, forward_fn)
    finally:
        for h in hooks:
            h.remove()
    return counts


def count_macs(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None) -> float:
    """Total conv/linear MACs of one forward pass on ``example_inputs``."""
    return float(sum(count_layer_macs(model, example_inputs, forward_fn).values()))


class MacModel:
    """Predicts conv/linear MACs for any choice of kept units, from one traced forward pass.

    For every conv/linear layer, MACs scale with the kept fraction of its output channels times the kept fraction of
    its input channels (depthwise convs: output fraction only). ``out_units``/``in_units`` hold, per channel, the global
    unit id that owns it (-1: channel in no group, always kept).
    """

    def __init__(self, layer_macs: dict[str, float], out_units: dict[str, torch.Tensor],
                 in_units: dict[str, torch.Tensor], depthwise: set[str], n_units: int) -> None:
        self.names = list(layer_macs)
        self.base = torch.tensor([layer_macs[n] for n in self.names], dtype=torch.float64)
        self.out_units = [out_units[n] for n in self.names]
        self.in_units = [in_units[n] for n in self.names]
        self.depthwise = [n in depthwise for n in self.names]
        self.n_units = n_units
        self.total = float(self.base.sum())
        # per unit: (layer, channels it holds on the output side, on the input side)
        self.unit_layers: list[list[tuple[int, int, int]]] = [[] for _ in range(n_units)]
        for li in range(len(self.names)):
            counts: dict[int, list[int]] = {}
            for side, units in ((0, self.out_units[li]), (1, self.in_units[li])):
                ids, n = torch.unique(units[units >= 0], return_counts=True)
                for u, c in zip(ids.tolist(), n.tolist()):
                    counts.setdefault(u, [0, 0])[side] += c
            for u, (co, ci) in counts.items():
                self.unit_layers[u].append((li, co, ci))

    def layer_fracs(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept fraction of output and input channels of every layer for a bool vector over all units."""
        ext = torch.cat([keep.to(torch.float64), torch.ones(1, dtype=torch.float64)])
        fo = torch.stack([ext[u].mean() if len(u) else ext[-1] for u in self.out_units])
        fi = torch.stack([ext[u].mean() if len(u) else ext[-1] for u in self.in_units])
        fi = torch.where(torch.tensor(self.depthwise), torch.ones_like(fi), fi)
        return fo, fi

    def macs(self, keep: torch.Tensor) -> float:
        """Predicted MACs when exactly the units with ``keep[u] == True`` remain."""
        fo, fi = self.layer_fracs(keep)
        return float((self.base * fo * fi).sum())

    def counter(self, keep: torch.Tensor) -> "_IncrementalMacs":
        """A MAC counter that updates in O(layers touched) when one unit is removed (used by greedy planning)."""
        return _IncrementalMacs(self, keep)


class _IncrementalMacs:
    def __init__(self, model: MacModel, keep: torch.Tensor) -> None:
        self.model = model
        ext = torch.cat([keep.long(), torch.ones(1, dtype=torch.long)])
        self.kept_out = [int(ext[u].sum()) if len(u) else 1 for u in model.out_units]
        self.kept_in = [int(ext[u].sum()) if len(u) else 1 for u in model.in_units]
        self.n_out = [max(len(u), 1) for u in model.out_units]
        self.n_in = [max(len(u), 1) for u in model.in_units]
        self.value = sum(self._layer(i) for i in range(len(model.names)))

    def _layer(self, i: int) -> float:
        fo = self.kept_out[i] / self.n_out[i]
        fi = 1.0 if self.model.depthwise[i] else self.kept_in[i] / self.n_in[i]
        return float(self.model.base[i]) * fo * fi

    def saving(self, unit: int) -> float:
        """MACs saved by removing ``unit`` now."""
        saved = 0.0
        for li, co, ci in self.model.unit_layers[unit]:
            before = self._layer(li)
            self.kept_out[li] -= co
            self.kept_in[li] -= ci
            saved += before - self._layer(li)
            self.kept_out[li] += co
            self.kept_in[li] += ci
        return saved

    def remove(self, unit: int) -> None:
        for li, co, ci in self.model.unit_layers[unit]:
            before = self._layer(li)
            self.kept_out[li] -= co
            self.kept_in[li] -= ci
            self.value -= before - self._layer(li)
