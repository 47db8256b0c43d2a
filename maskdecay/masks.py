"""Channel masks: one learnable value per prunable unit, applied to a model with forward hooks."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .graph import Group, _is_depthwise, find_groups
from .macs import MacModel, count_layer_macs

log = logging.getLogger(__name__)


def _input_spec(example_inputs: Any) -> list[dict] | None:
    """Shapes and dtypes of the example inputs when they are tensors (so a checkpoint can rebuild them), else None."""
    items = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    if not all(isinstance(t, torch.Tensor) for t in items):
        return None
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in items]


def _out_channels(module: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features", "num_channels", "num_parameters"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise TypeError(f"cannot tell the channel count of {type(module).__name__}")


class ChannelMasks:
    """Masks on every prunable output channel of ``model``, grouped by dependency.

    Groups come from Torch-Pruning's ``DependencyGraph``, extended to pixel (un)shuffle and GroupNorm couplings
    (see :mod:`maskdecay.graph`). Each group holds one mask vector (``float32``, initially 1) with one entry per unit;
    the mask multiplies the output of every layer that produces the group's channels (after its norm layer), so a
    zero entry zeroes the channel everywhere it is read and removing it later changes nothing.

    Args:
        model: the teacher. Hooks are attached at once; :meth:`remove` detaches them (``export`` does it for you).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, used to trace the model
            and count MACs.
        ignored_layers: layers (with their submodules) whose output channels must not change, e.g. the classifier
            (as in Torch-Pruning, their input channels may still shrink with the layer that feeds them).
        round_to: plans keep a multiple of this many units per group (e.g. 8 for fast kernels).
        forward_fn: ``forward_fn(model, example_inputs)`` when the model is not called as ``model(*inputs)``.
        output_transform: maps a non-tensor output (a dict, a dataclass...) to a tensor or a list of tensors.

    Raises:
        ValueError: the model has no prunable channel group, or ``round_to`` < 1.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignored_layers: Sequence[nn.Module] = (),
                 round_to: int = 1, forward_fn: Callable | None = None,
                 output_transform: Callable | None = None) -> None:
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.model = model
        self.round_to = int(round_to)
        self.forward_fn = forward_fn
        names = {m: n for n, m in model.named_modules()}
        self.ignored_names = [names[m] for m in ignored_layers if m in names]
        self.input_spec = _input_spec(example_inputs)
        self.groups: list[Group] = find_groups(model, example_inputs, ignored_layers, forward_fn, output_transform)
        if not self.groups:
            raise ValueError(
                f"{type(model).__name__} has no prunable channel group: every conv/linear layer is ignored, feeds the "
                "model output directly, or is coupled to a layer maskdecay cannot shrink exactly")
        self._by_name = {g.name: g for g in self.groups}
        self.offsets = [0]
        for g in self.groups:
            self.offsets.append(self.offsets[-1] + g.size)
        self.mac_model = self._build_mac_model(example_inputs)
        self.teacher_macs = self.mac_model.total
        full = torch.ones(self.n_units, dtype=torch.bool)
        counter = self.mac_model.counter(full)
        for g in self.groups:
            g.macs_per_unit = sum(counter.saving(self.offsets[g.index] + u) for u in range(g.size)) / g.size
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.values = [nn.Parameter(torch.ones(g.size, device=device)) for g in self.groups]
        self.plan = None  # set by MaskDecay / apply_plan
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.attach()

    # ------------------------------------------------------------------ structure
    @property
    def n_units(self) -> int:
        """Total number of mask entries over all groups."""
        return self.offsets[-1]

    def __getitem__(self, name: str) -> Group:
        if name not in self._by_name:
            raise ValueError(f"unknown group {name!r}; groups are: {', '.join(self._by_name)}")
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.groups)

    def signature(self) -> list[list]:
        """``[[group name, size], ...]``: what a plan must match to apply to these masks."""
        return [[g.name, g.size] for g in self.groups]

    def _build_mac_model(self, example_inputs: Any) -> MacModel:
        layer_macs = count_layer_macs(self.model, example_inputs, self.forward_fn)
        modules = dict(self.model.named_modules())
        out_units, in_units, depthwise = {}, {}, set()
        for name in layer_macs:
            m = modules[name]
            n_out = _out_channels(m)
            n_in = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
            out_units[name] = torch.full((n_out,), -1, dtype=torch.long)
            in_units[name] = torch.full((n_in,), -1, dtype=torch.long)
            if _is_depthwise(m):
                depthwise.add(name)
        for g in self.groups:
            off = self.offsets[g.index]
            for mem in g.members:
                table = out_units if mem.role == "out" else in_units
                if mem.name in table:
                    table[mem.name][mem.idxs] = mem.units + off
                if mem.name in depthwise:  # depthwise: input channels are the output channels
                    in_units[mem.name][mem.idxs] = mem.units + off
        return MacModel(layer_macs, out_units, in_units, depthwise, self.n_units)

    def macs(self, keep: dict[str, torch.Tensor] | None = None) -> float:
        """Predicted conv/linear MACs when, per group name, only the units in ``keep[name]`` (indices) remain."""
        flat = torch.ones(self.n_units, dtype=torch.bool)
        for name, kept in (keep or {}).items():
            g = self[name]
            sl = flat[self.offsets[g.index]:self.offsets[g.index + 1]]
            sl[:] = False
            sl[torch.as_tensor(kept, dtype=torch.long)] = True
        return self.mac_model.macs(flat)

    # ------------------------------------------------------------------ mask values
    def parameters(self) -> Iterator[nn.Parameter]:
        """The mask vectors (one per group). They are not parameters of the model."""
        return iter(self.values)

    def value(self, name: str) -> torch.Tensor:
        """The mask vector of group ``name``."""
        return self.values[self[name].index]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{group name: mask vector}``."""
        return {g.name: v.detach().clone() for g, v in zip(self.groups, self.values)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load mask vectors saved by :meth:`state_dict`; names and sizes must match."""
        missing = set(self._by_name) - set(state)
        if missing or len(state) != len(self.groups):
            raise ValueError(f"mask state does not match these groups (missing: {sorted(missing)[:5]}, "
                             f"unexpected: {sorted(set(state) - set(self._by_name))[:5]})")
        with torch.no_grad():
            for g, v in zip(self.groups, self.values):
                if state[g.name].shape != v.shape:
                    raise ValueError(f"mask of group {g.name!r} has shape {tuple(state[g.name].shape)}, "
                                     f"expected {tuple(v.shape)}")
                v.copy_(state[g.name])

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Attach the forward hooks that multiply layer outputs by the masks (done by the constructor)."""
        if self._handles:
            return
        per_module: dict[int, tuple[nn.Module, list]] = {}
        for g in self.groups:
            for mp in g.mask_points:
                per_module.setdefault(id(mp.module), (mp.module, []))[1].append((g.index, mp.idxs, mp.units))
        for module, entries in per_module.values():
            self._handles.append(module.register_forward_hook(self._make_hook(module, entries)))

    def remove(self) -> None:
        """Detach the hooks: the model runs unmasked again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the masks currently act on the model."""
        return bool(self._handles)

    def _make_hook(self, module: nn.Module, entries: list) -> Callable:
        channel_last = isinstance(module, nn.Linear)
        n = _out_channels(module)
        values = self.values
        simple = None
        if len(entries) == 1:
            gi, idxs, units = entries[0]
            if len(idxs) == n and torch.equal(idxs, torch.arange(n)):
                simple = (gi, None if torch.equal(units, torch.arange(n)) else units)

        def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            dim = out.dim() - 1 if channel_last else 1
            if simple is not None:
                gi, units = simple
                vec = values[gi] if units is None else values[gi][units.to(out.device)]
            else:
                vec = torch.ones(out.shape[dim], device=out.device, dtype=values[0].dtype)
                for gi, idxs, units in entries:
                    vec = vec.index_copy(0, idxs.to(out.device), values[gi][units.to(out.device)])
            shape = [1] * out.dim()
            shape[dim] = out.shape[dim]
            return out * vec.to(out.dtype).view(shape)
        return hook

    def __repr__(self) -> str:
        return (f"ChannelMasks({len(self.groups)} groups, {self.n_units} units, "
                f"teacher MACs {self.teacher_macs / 1e6:.2f} M)")
