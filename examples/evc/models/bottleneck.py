"""The entropy bottleneck's rate model: the factorized CDF of the hyper latent z and the continuous bit estimates
of both latents (the model's own formulas, as in the official code; coding uses the tables built from them)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bitparm", "BitEstimator", "gaussian_bits", "factorized_bits"]


class Bitparm(nn.Module):
    """One layer of the per-channel monotone CDF: ``x*softplus(h)+b`` then ``x + tanh(x)*tanh(a)`` (not in the last)."""

    def __init__(self, channels: int, final: bool = False) -> None:
        super().__init__()
        self.final = final
        self.h = nn.Parameter(torch.empty(1, channels, 1, 1).normal_(0, 0.01))
        self.b = nn.Parameter(torch.empty(1, channels, 1, 1).normal_(0, 0.01))
        if not final:
            self.a = nn.Parameter(torch.empty(1, channels, 1, 1).normal_(0, 0.01))
        else:
            self.register_parameter("a", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * nn.functional.softplus(self.h) + self.b
        if self.final:
            return x
        return x + torch.tanh(x) * torch.tanh(self.a)


class BitEstimator(nn.Module):
    """Per-channel factorized CDF for z: 4 Bitparm layers followed by a sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f1 = Bitparm(channels)
        self.f2 = Bitparm(channels)
        self.f3 = Bitparm(channels)
        self.f4 = Bitparm(channels, final=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid CDF values."""
        return self.f4(self.f3(self.f2(self.f1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))



def gaussian_bits(residual: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-log2(Phi((r+.5)/s) - Phi((r-.5)/s) + 1e-5), s clamped to [0.11, 1e10], clamped at >= 0."""
    s = scales.clamp(0.11, 1e10)
    p = torch.special.ndtr((residual + 0.5) / s) - torch.special.ndtr((residual - 0.5) / s)
    return torch.clamp_min(-torch.log2(p + 1e-5), 0.0)


def factorized_bits(bit_estimator: torch.nn.Module, z_hat: torch.Tensor) -> torch.Tensor:
    """-log2(CDF(z+.5) - CDF(z-.5) + 1e-5), clamped at >= 0."""
    p = bit_estimator(z_hat + 0.5) - bit_estimator(z_hat - 0.5)
    return torch.clamp_min(-torch.log2(p + 1e-5), 0.0)

