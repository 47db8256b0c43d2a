"""Decay schedules: the ceiling ``s(t)`` of the removed masks, from 1 at step 0 to exactly 0 at step N."""
from __future__ import annotations

import math
from typing import Callable, Union

Schedule = Callable[[int, int], float]
ScheduleLike = Union[str, Schedule]


def linear(t: int, n: int) -> float:
    """``1 - t/N``."""
    return max(0.0, 1.0 - t / n)


def cosine(t: int, n: int) -> float:
    """``(1 + cos(pi t/N)) / 2``: slow at both ends, the network adapts most while masks are near 1 and near 0."""
    if t >= n:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * t / n))


def exp(t: int, n: int, rate: float = 5.0) -> float:
    """Exponential decay shifted to hit 0 at N: ``(e^{-rate t/N} - e^{-rate}) / (1 - e^{-rate})``."""
    if t >= n:
        return 0.0
    return (math.exp(-rate * t / n) - math.exp(-rate)) / (1.0 - math.exp(-rate))


def step(t: int, n: int, stages: int = 4) -> float:
    """Piecewise constant: drops by ``1/stages`` every ``N/stages`` steps."""
    if t >= n:
        return 0.0
    return 1.0 - math.floor(t * stages / n) / stages


SCHEDULES: dict[str, Schedule] = {"linear": linear, "cosine": cosine, "exp": exp, "step": step}


def within(fraction: float, schedule: ScheduleLike = "cosine") -> Schedule:
    """``schedule`` compressed into the first ``fraction`` of the phase (exactly 0 from ``fraction * N`` on): the
    removed channels go early and the network trains without them for the rest of the decay phase.
    ``within(1.0, s)`` is ``s``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    base = get_schedule(schedule)
    if fraction == 1.0:
        return base

    def compressed(t: int, n: int) -> float:
        end = max(1, round(fraction * n))
        return 0.0 if t >= end else float(base(t, end))

    compressed.__name__ = f"{getattr(base, '__name__', 'callable')}_within_{fraction:g}"
    return compressed


def get_schedule(schedule: ScheduleLike) -> Schedule:
    """A schedule by name (``linear``, ``cosine``, ``exp``, ``step``) or a callable ``f(t, N) -> [0, 1]``."""
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {sorted(SCHEDULES)} or a callable f(t, N)")
    return SCHEDULES[schedule]


def evaluate(schedule: Schedule, t: int, n: int) -> float:
    """``schedule(t, n)`` checked to lie in [0, 1], and forced to 0 from step N on."""
    if t >= n:
        return 0.0
    v = float(schedule(t, n))
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise ValueError(f"schedule returned {v} at step {t}/{n}; it must return values in [0, 1]")
    return v
