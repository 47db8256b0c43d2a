"""Quality metrics, RD result files (CompressAI-style JSON), BD-rate and RD plots."""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from importlib import resources
from typing import Any, Sequence

import numpy as np
import torch
from pytorch_msssim import ms_ssim as _ms

from ..fileio import atomic_write_bytes

__all__ = [
    "psnr",
    "ms_ssim",
    "load_results",
    "official_names",
    "bd_rate",
    "plot_rd",
]


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """RGB PSNR in dB for images in [0,1]: 20*log10(1/sqrt(MSE)), MSE over all channels and pixels (float)."""
    mse = float(torch.mean((x_hat.double() - x.double()) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ms_ssim(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """MS-SSIM (pytorch_msssim, data_range=1) on RGB; NaN for images smaller than the 5-scale minimum (161 px)."""
    if min(x.shape[-2:]) <= 160:
        return float("nan")
    return float(_ms(x_hat.float(), x.float(), data_range=1.0))


def official_names() -> list[str]:
    """Names of the shipped official curves, usable as ``official:<name>``."""
    out = []
    for p in resources.files("maskdecay_examples.evc").joinpath("data").iterdir():
        n = p.name
        if n.startswith("official_") and n.endswith(".json"):
            out.append(n[len("official_"):-len(".json")])
    return sorted(out)


def load_results(spec: str) -> dict[str, Any]:
    """Load a results JSON from a path or ``official:EVC_LL`` (shipped curves). Validates the layout."""
    if spec.startswith("official:"):
        name = spec.split(":", 1)[1]
        if name not in official_names():
            raise ValueError(f"no official curve {name!r}; available: {', '.join(official_names())}")
        text = resources.files("maskdecay_examples.evc").joinpath("data", f"official_{name}.json").read_text()
        src = spec
    else:
        if not os.path.isfile(spec):
            raise ValueError(f"{spec}: no such file")
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        src = spec
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict) or not isinstance(d.get("results"), dict) or "bpp" not in d["results"]:
        raise ValueError(f"{src}: not a results file (need results.bpp)")
    d.setdefault("name", os.path.basename(src))
    return d


def _curve(d: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray]:
    r = d["results"]
    key = {"psnr": "psnr-rgb", "ms-ssim": "ms-ssim-rgb"}[metric]
    if key not in r:
        raise ValueError(f"{d['name']}: has no {key} values")
    rate = np.asarray(r["bpp"], dtype=np.float64)
    dist = np.asarray(r[key], dtype=np.float64)
    if metric == "ms-ssim":
        dist = -10.0 * np.log10(1.0 - dist)
    ok = np.isfinite(rate) & np.isfinite(dist)
    rate, dist = rate[ok], dist[ok]
    o = np.argsort(rate)
    return rate[o], dist[o]


def bd_rate(anchor: dict[str, Any], test: dict[str, Any], method: str = "akima",
            metric: str = "psnr") -> tuple[float, float]:
    """(BD-rate in %, BD-PSNR in dB) of ``test`` against ``anchor`` via the ``bjontegaard`` package.

    ``method`` is the bjontegaard interpolation: "akima" (default), "pchip" or "cubic"."""
    import bjontegaard as bd  # here: it imports scipy, about 1 s of start-up

    ra, da = _curve(anchor, metric)
    rt, dt = _curve(test, metric)
    if len(ra) < 4 or len(rt) < 4:
        raise ValueError("BD-rate needs at least 4 rate points per curve")
    unit = "dB" if metric == "psnr" else "MS-SSIM dB"
    lo, hi = max(min(da), min(dt)), min(max(da), max(dt))
    if not lo < hi:
        raise ValueError(f"the curves do not overlap in quality (anchor {min(da):.2f}-{max(da):.2f} {unit}, test "
                         f"{min(dt):.2f}-{max(dt):.2f} {unit}): BD-rate is undefined")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rate = float(bd.bd_rate(ra, da, rt, dt, method=method, require_matching_points=False))
            dq = float(bd.bd_psnr(ra, da, rt, dt, method=method, require_matching_points=False))
    except Exception as e:  # noqa: BLE001 - bjontegaard raises various errors on non-overlapping curves
        raise ValueError(f"BD computation failed ({e})") from None
    if not (math.isfinite(rate) and math.isfinite(dq)):
        raise ValueError("BD-rate is undefined for these curves (their rate or quality ranges do not overlap)")
    return rate, dq


def bd_or_nan(anchor: dict[str, Any], test: dict[str, Any], method: str = "pchip",
              metric: str = "psnr") -> tuple[float, float]:
    """(BD-rate in %, BD-PSNR in dB) for tables, each computed where it exists and NaN where it does not: BD-rate
    needs the quality ranges to overlap, BD-PSNR the rate ranges; both need 4 points per curve. bjontegaard's
    warnings are silenced."""
    import bjontegaard as bd  # here: it imports scipy, about 1 s of start-up

    ra, da = _curve(anchor, metric)
    rt, dt = _curve(test, metric)
    if len(ra) < 4 or len(rt) < 4:
        return float("nan"), float("nan")
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, t, fn in ((da, dt, bd.bd_rate), (ra, rt, bd.bd_psnr)):
            value = float("nan")
            if max(min(a), min(t)) < min(max(a), max(t)):
                try:
                    value = float(fn(ra, da, rt, dt, method=method, require_matching_points=False))
                except Exception:  # noqa: BLE001 - bjontegaard raises various errors on degenerate curves
                    pass
            out.append(value if math.isfinite(value) else float("nan"))
    return out[0], out[1]


def plot_rd(results: Sequence[dict[str, Any]], out: str, metric: str = "psnr", title: str | None = None) -> None:
    """Plot RD curves (bpp vs PSNR or MS-SSIM dB) to an image file, written atomically."""
    from matplotlib.figure import Figure  # here: matplotlib adds about 0.5 s to every command's start-up

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for d in results:
        r, q = _curve(d, metric)
        style = "--" if "official" in d["name"].lower() else "-"
        ax.plot(r, q, style, marker="o", label=d["name"])
    ax.set_xlabel("Bit-rate [bpp]")
    ax.set_ylabel("PSNR [dB]" if metric == "psnr" else "MS-SSIM [dB]")
    ax.grid(True, alpha=0.4)
    ax.legend()
    if title:
        ax.set_title(title)
    buf = io.BytesIO()
    ext = os.path.splitext(out)[1].lower().lstrip(".") or "png"
    fig.savefig(buf, format=ext if ext in ("png", "pdf", "svg") else "png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(out, buf.getvalue())
