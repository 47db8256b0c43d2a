"""Channel masks: one learnable value per prunable unit, applied to a model with forward hooks."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .graph import Group, find_groups
from .macs import MacModel, count_layer_macs
from .shrink import inexact_groups

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


def _fold_dims(module: nn.Module) -> dict[str, int] | None:
    """``{parameter name: dim of its output channels}`` when a mask can be folded into ``module``'s parameters."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return {"weight": 0, "bias": 0} if module.weight is not None and module.bias is not None else None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        dims = {"weight": 1} if module.groups == 1 else None
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        dims = {"weight": 0}
    else:
        return None
    if dims is not None and module.bias is not None:
        dims["bias"] = 0
    return dims


def _fold_hooks(dims: dict[str, int], vector: Callable[[torch.device], torch.Tensor]) -> tuple[Callable, Callable]:
    """Forward pre-hook and hook that swap ``param·mask`` in for each parameter in ``dims``, then restore it."""
    def swap(mod: nn.Module, inputs: tuple) -> None:
        originals = {name: mod._parameters[name] for name in dims}
        vec = vector(originals["weight"].device)
        for name, dim in dims.items():
            p = originals[name]
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            mod._parameters[name] = p * vec.to(p.dtype).view(shape)
        mod._maskdecay_originals = originals

    def restore(mod: nn.Module, inputs: tuple, out: Any) -> None:
        originals = mod.__dict__.pop("_maskdecay_originals", None)
        if originals is not None:
            mod._parameters.update(originals)
    return swap, restore


def _multiply_output(module: nn.Module, vector: Callable[[torch.device], torch.Tensor]) -> Callable:
    """Forward hook multiplying the output channels of ``module`` by the mask."""
    channel_last = isinstance(module, nn.Linear)

    def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        dim = out.dim() - 1 if channel_last else 1
        shape = [1] * out.dim()
        shape[dim] = out.shape[dim]
        return out * vector(out.device).to(out.dtype).view(shape)
    return hook


class ChannelMasks:
    """Masks on every prunable output channel of ``model``, grouped by dependency.

    Groups come from Torch-Pruning's ``DependencyGraph``, with every edge mapped by maskdecay (cat, split/chunk, pixel
    (un)shuffle, flatten, GroupNorm groups, whole conv groups of grouped convs; see :mod:`maskdecay.graph`). Layers
    that cannot be pruned exactly are left whole: ``unpruned`` (``{layer name: reason}`` for every conv/linear layer
    in no group) says which and why, and one INFO line lists them. Each group holds one mask vector (``float32``,
    initially 1) with one entry per unit; the mask multiplies the output of every layer that produces the group's
    channels (after its norm layer), so a zero entry zeroes the channel everywhere it is read and removing it later
    changes nothing.

    Args:
        model: the teacher. Hooks are attached at once; :meth:`remove` detaches them (``export`` does it for you).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, used to trace the model
            and count MACs.
        ignored_layers: layers (with their submodules) whose output channels must not change, e.g. the classifier
            (as in Torch-Pruning, their input channels may still shrink with the layer that feeds them).
        round_to: plans keep a multiple of this many units per group (e.g. 8 for fast kernels).
        forward_fn: ``forward_fn(model, example_inputs)`` when the model is not called as ``model(*inputs)``.
        output_transform: maps a non-tensor output (a dict, a dataclass...) to a tensor or a list of tensors.
        verify: check, on the example inputs in eval mode, that removing half of every group's units from a copy
            of the model gives the masked model's output; groups that do not (a coupling the graph misses) are left
            whole, with the reason in :attr:`unpruned`. Costs a copy of the model and a few forward passes.

    Raises:
        ValueError: the model has no prunable channel group, or ``round_to`` < 1.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignored_layers: Sequence[nn.Module] = (),
                 round_to: int = 1, forward_fn: Callable | None = None,
                 output_transform: Callable | None = None, verify: bool = True) -> None:
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.model = model
        self.round_to = int(round_to)
        self.forward_fn = forward_fn
        self.output_transform, self.example_inputs = output_transform, example_inputs
        names = {m: n for n, m in model.named_modules()}
        self.ignored_names = [names[m] for m in ignored_layers if m in names]
        self.input_spec = _input_spec(example_inputs)
        groups, self.unpruned = find_groups(model, example_inputs, ignored_layers, forward_fn, output_transform)
        self._setup(groups)
        if verify:
            gen = torch.Generator().manual_seed(0)
            dead = [torch.randperm(g.size, generator=gen) < g.size // 2 for g in self.groups]
            bad = set(inexact_groups(self, dead, self.values) or ())
            self.unpruned.update({m.name: "removing channels of its group changes the output (exactness check)"
                                  for i in bad for m in self.groups[i].members
                                  if m.role == "out" and isinstance(m.module, (nn.modules.conv._ConvNd, nn.Linear))})
            if bad:
                self.remove()
                self._setup([g for i, g in enumerate(groups) if i not in bad])
        if self.unpruned:
            log.info("%s: %d conv/linear layers left whole: %s", type(model).__name__, len(self.unpruned), "; ".join(
                f"{why}: {', '.join(n for n, w in self.unpruned.items() if w == why)}"
                for why in dict.fromkeys(self.unpruned.values())))

    def _setup(self, groups: list[Group]) -> None:
        """Index the groups, count their MACs, create their mask vectors and attach the hooks."""
        if not groups:
            raise ValueError(
                f"{type(self.model).__name__} has no prunable channel group: every conv/linear layer is ignored, "
                "feeds the model output directly, or is coupled to a layer maskdecay cannot shrink exactly "
                "(see the INFO log of maskdecay.masks)")
        self.groups: list[Group] = groups
        for i, g in enumerate(groups):
            g.index = i
        self._by_name = {g.name: g for g in self.groups}
        self.offsets = [0]
        for g in self.groups:
            self.offsets.append(self.offsets[-1] + g.size)
        self.mac_model = self._build_mac_model(self.example_inputs)
        self.teacher_macs = self.mac_model.total
        full = torch.ones(self.n_units, dtype=torch.bool)
        counter = self.mac_model.counter(full)
        for g in self.groups:
            g.macs_per_unit = sum(counter.saving(self.offsets[g.index] + u) for u in range(g.size)) / g.size
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
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
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:  # MACs scale with kept outputs only
                depthwise.add(name)
        for g in self.groups:
            off = self.offsets[g.index]
            for mem in g.members:
                table = out_units if mem.role == "out" else in_units
                if mem.name in table:
                    table[mem.name][mem.idxs] = mem.units + off
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
        """Make the masks act on the model (done by the constructor).

        Where the masked layer is a conv, linear or affine norm layer, the mask is folded into its parameters for the
        duration of each forward (``W·m``, ``b·m``; ``γ·m``, ``β·m`` for a norm), which costs O(channels) instead of
        a multiply over the whole activation. Other layers get their output multiplied. Both give the same output
        and the same gradients; the model's parameters and ``state_dict`` are left untouched.
        """
        if self._handles:
            return
        per_module: dict[int, tuple[nn.Module, list]] = {}
        for g in self.groups:
            for mp in g.mask_points:
                per_module.setdefault(id(mp.module), (mp.module, []))[1].append((g.index, mp.idxs, mp.units))
        for module, entries in per_module.values():
            vector = self._mask_vector(module, entries)
            dims = _fold_dims(module)
            if dims is None:
                self._handles.append(module.register_forward_hook(_multiply_output(module, vector)))
            else:
                swap, restore = _fold_hooks(dims, vector)
                self._handles.append(module.register_forward_pre_hook(swap))
                self._handles.append(module.register_forward_hook(restore, always_call=True))

    def remove(self) -> None:
        """Detach the masks: the model runs unmasked again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether the masks currently act on the model."""
        return bool(self._handles)

    def _mask_vector(self, module: nn.Module, entries: list) -> Callable[[torch.device], torch.Tensor]:
        """A function giving the mask of each output channel of ``module`` (1 where no group masks it)."""
        n = _out_channels(module)
        values = self.values
        if len(entries) == 1:
            gi, idxs, units = entries[0]
            if len(idxs) == n and torch.equal(idxs, torch.arange(n)):
                if torch.equal(units, torch.arange(n)):
                    return lambda device: values[gi]
                return lambda device: values[gi][units.to(device)]

        def vector(device: torch.device) -> torch.Tensor:
            vec = torch.ones(n, device=device, dtype=values[0].dtype)
            for gi, idxs, units in entries:
                vec = vec.index_copy(0, idxs.to(device), values[gi][units.to(device)])
            return vec
        return vector

    def __repr__(self) -> str:
        return (f"ChannelMasks({len(self.groups)} groups, {self.n_units} units, "
                f"teacher MACs {self.teacher_macs / 1e6:.2f} M)")
