"""Rate control: the q_scale a stream is coded at, resolved from a quality knob, an explicit q_scale or an anchor
index, and the quantisation step it implies."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..models.architectures import EVC, SCALE_LAMBDAS
from .bitstream import q_scale_error

__all__ = ["RateSpec", "select_rate", "interp_log", "curr_q64"]


@dataclass(frozen=True)
class RateSpec:
    """A resolved rate: the float32 q_scale used by encoder and decoder, the anchor index (255 if none) and the
    RD lambda used by the scalable models to pick an encoder candidate."""

    q_scale: float
    rate_index: int
    lam: float


def _f32(v: float) -> float:
    return float(np.float32(v))


def interp_log(values: list[float], t: float) -> float:
    """Piecewise log-linear interpolation of ``values`` at position ``t`` (0 = first value, len - 1 = last), clamped
    to the ends."""
    n = len(values)
    if n == 1:
        return values[0]
    t = min(max(t, 0.0), float(n - 1))
    i = min(int(math.floor(t)), n - 2)
    f = t - i
    a, b = math.log(values[i]), math.log(values[i + 1])
    return math.exp(a + f * (b - a))


def select_rate(model: EVC, q: float | None = None, q_scale: float | None = None,
                rate_index: int | None = None) -> RateSpec:
    """Resolve exactly one of ``q`` in [0,1] (0 = lowest-rate anchor, 1 = highest; piecewise log interpolation
    between the anchors, so q = k/(n-1) is anchor k), ``q_scale`` (> 0, used directly) or ``rate_index``.
    Nothing given means ``q = 1`` (the highest-quality anchor). The q_scale is rounded to float32, the precision
    stored in the stream."""
    given = [v is not None for v in (q, q_scale, rate_index)]
    if sum(given) > 1:
        raise ValueError("give only one of q, q_scale, rate_index")
    anchors = model.anchors()
    n = len(anchors)
    if any(not (a > 0 and math.isfinite(a)) for a in anchors):
        raise ValueError(f"model has invalid q_scale anchors {anchors}")
    lams = list(SCALE_LAMBDAS) if n == len(SCALE_LAMBDAS) else [SCALE_LAMBDAS[0]] * n
    if rate_index is not None:
        if not 0 <= int(rate_index) < n:
            raise ValueError(f"rate index must be in 0..{n - 1}, got {rate_index}")
        i = int(rate_index)
        return RateSpec(_f32(anchors[i]), i, lams[i])
    if q_scale is not None:
        err = q_scale_error(_f32(q_scale)) if q_scale > 0 and math.isfinite(q_scale) else "not a positive number"
        if err is not None:
            raise ValueError(f"q_scale {q_scale:g}: {err}")
        # lambda: place q_scale on the anchor curve (log domain), clamp to the ends
        la = [math.log(a) for a in anchors]
        lq = math.log(q_scale)
        t = 0.0
        if n > 1 and la[0] != la[-1]:
            for i in range(n - 1):
                lo, hi = la[i], la[i + 1]
                if (lo - lq) * (hi - lq) <= 0 and lo != hi:
                    t = i + (lq - lo) / (hi - lo)
                    break
            else:
                t = 0.0 if abs(lq - la[0]) < abs(lq - la[-1]) else n - 1.0
        return RateSpec(_f32(q_scale), 255, interp_log(lams, t))
    if q is None:
        q = 1.0
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"q must be in [0, 1], got {q}")
    t = q * (n - 1)
    idx = int(round(t)) if abs(t - round(t)) < 1e-9 else 255
    if idx != 255:
        return RateSpec(_f32(anchors[idx]), idx, lams[idx])
    return RateSpec(_f32(interp_log(anchors, t)), 255, interp_log(lams, t))


# ---------------------------------------------------------------------------------------------------------------


def curr_q64(model: EVC, q_scale: float) -> torch.Tensor:
    """The per-channel quantisation step of the latent at ``q_scale``, in float64 (``q_basic`` floored at 0.5)."""
    return torch.clamp_min(model.q_basic.detach().to(torch.float64), 0.5) * float(q_scale)
