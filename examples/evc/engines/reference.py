"""The reference engine: the model's own float32 modules for the float transforms and the exact float64 twins of
:mod:`.exact` for the entropy parameters and the exact synthesis."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.architectures import EVC, ScalableEVC
from .base import ModelCache, state_key
from .exact import ExactNet

__all__ = ["ReferenceEngine"]


@dataclass(frozen=True)
class _ExactTwins:
    hyper_dec: ExactNet
    fusion: ExactNet
    spatial: ExactNet
    synthesis: ExactNet


def _build_twins(model: nn.Module) -> _ExactTwins:
    return _ExactTwins(ExactNet(model.hyper_dec), ExactNet(model.y_prior_fusion), ExactNet(model.y_spatial_prior),
                       ExactNet(model.dec))


#: building the twins quantises every decoder-side weight: done once per model and weights, not per image
_TWINS: ModelCache[_ExactTwins] = ModelCache(_build_twins)


class ReferenceEngine:
    """The plain inference path (implements :class:`~.base.Engine`): the model's own float32 modules (eager) for
    the analysis, ``hyper_enc`` and the float synthesis, and the exact float64 twins for the entropy parameters and
    the exact synthesis."""

    def __init__(self, model: EVC) -> None:
        self.model = model
        self.key = state_key(model)
        self._twins = _TWINS.get(model)

    def latents(self, xp: torch.Tensor, enc_id: int | None) -> torch.Tensor:
        """Candidate latents (K,B,N,h,w): K = 1 except for scalable models without ``enc_id``."""
        if isinstance(self.model, ScalableEVC):
            return self.model.candidates(xp, enc_id)
        return self.model.enc(xp).unsqueeze(0)

    def hyper_enc(self, y: torch.Tensor) -> torch.Tensor:
        """hyper_enc of y / curr_q (float32), before rounding."""
        return self.model.hyper_enc(y)

    def prior(self, z_hat64: torch.Tensor) -> torch.Tensor:
        """Exact ``y_prior_fusion(hyper_dec(z_hat))`` in float64."""
        return self._twins.fusion(self._twins.hyper_dec(z_hat64))

    def spatial(self, inp: torch.Tensor) -> torch.Tensor:
        """Exact ``y_spatial_prior`` in float64."""
        return self._twins.spatial(inp)

    def synthesis(self, y64: torch.Tensor, exact: bool) -> torch.Tensor:
        """Image (before clamping) from the dequantised latent: exact float64 twin, or the float32 ``dec``."""
        if exact:
            return self._twins.synthesis(y64)
        return self.model.dec(y64.to(torch.float32))
