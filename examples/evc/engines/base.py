"""The interface every inference engine of the codec implements, and the weight-version key engines use to notice
that a model's weights changed after they were built.

An engine runs the networks of one EVC model for :mod:`~maskdecay_examples.evc.coding.codec`: the float transforms
(analysis, hyper encoder, float synthesis), whose precision is free, and the entropy-parameter networks (hyper
decoder, prior fusion, spatial prior) and the exact synthesis, which must give the same float64 numbers on every
engine, thread count and machine, so that any engine decodes any engine's stream.
"""
from __future__ import annotations

import weakref
from typing import Callable, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

__all__ = ["Engine", "state_key", "ModelCache"]

T = TypeVar("T")


def state_key(model: nn.Module) -> tuple:
    """Identifies the current weights of ``model``: storage and version counter of every parameter, and the device.
    Any in-place update of a parameter, a ``load_state_dict`` or a move changes it."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters()) + (str(next(model.parameters()).device),)


@runtime_checkable
class Engine(Protocol):
    """The networks of one model as the coding loop calls them. ``model`` is the EVC model the engine was built
    for and ``key`` its :func:`state_key` at that time (the codec refuses an engine whose model changed since)."""

    model: nn.Module
    key: tuple

    def latents(self, xp: torch.Tensor, enc_id: int | None) -> torch.Tensor:
        """Candidate latents (K,B,N,h,w) of the padded image ``xp``: K = 1 except for scalable models without
        ``enc_id`` (one candidate per encoder prefix)."""
        ...

    def hyper_enc(self, y: torch.Tensor) -> torch.Tensor:
        """The hyper encoder of y / curr_q (float32), before rounding."""
        ...

    def prior(self, z_hat64: torch.Tensor) -> torch.Tensor:
        """Exact ``y_prior_fusion(hyper_dec(z_hat))`` in float64."""
        ...

    def spatial(self, inp: torch.Tensor) -> torch.Tensor:
        """Exact ``y_spatial_prior`` in float64."""
        ...

    def synthesis(self, y64: torch.Tensor, exact: bool) -> torch.Tensor:
        """The image (before clamping) from the dequantised latent: the exact float64 twin, or the float
        transform."""
        ...


class ModelCache(Generic[T]):
    """Per-model values derived from the weights (coding tables, exact twins), rebuilt when the weights change.

    Held by weak reference to the model, so a cached value never keeps a model alive; the value itself must not
    refer to the model object (it may refer to its submodules or tensors)."""

    def __init__(self, build: Callable[[nn.Module], T]) -> None:
        self._build = build
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, T]] = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module) -> T:
        """The value for ``model``'s current weights, built on first use and after every change of the weights."""
        key = state_key(model)
        entry = self._entries.get(model)
        if entry is None or entry[0] != key:
            entry = (key, self._build(model))
            self._entries[model] = entry
        return entry[1]
