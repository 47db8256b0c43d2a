"""EVC model family: 9 single-encoder variants and the scalable-encoder models, with their registry (:data:`ARCHS`).

All facts (widths, module layout, parameter shapes, chunk orders) come from ``shared/reference/evc_official.md``;
the code is our own. State-dict keys match the official checkpoints, so ``load_state_dict(official, strict=True)``
works for every registered variant.

Widths are constructor arguments (``enc_widths``, ``dec_widths``, ``N``), so reduced families (e.g. a "mini"
family with every width divided by 4) can be built with the same classes and are recognised by
:func:`~maskdecay_examples.evc.models.zoo.load_model`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .bottleneck import BitEstimator, factorized_bits, gaussian_bits
from .layers import (
    DepthConvBlock,
    PriorDepthConvBlock,
    PriorDepthConvBlockUpsample,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    conv1x1,
    conv3x3,
)

__all__ = ["WIDTHS", "ARCHS", "ARCH_CODES", "SCALE_LAMBDAS", "DEFAULT_Q_SCALES", "EVC", "ScalableEVC", "checkerboard",
           "make_encoder", "make_decoder", "name_for"]

#: encoder/decoder width presets [C1, C2, C3, C4] (reference section 1.1)
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "L": (192, 192, 192, 192),
    "M": (128, 128, 192, 192),
    "S": (64, 64, 128, 192),
}

#: registered architectures: name -> (encoder size, decoder size, scalable)
ARCHS: dict[str, tuple[str, str, bool]] = {
    "EVC_LL": ("L", "L", False),
    "EVC_LM": ("L", "M", False),
    "EVC_LS": ("L", "S", False),
    "EVC_ML": ("M", "L", False),
    "EVC_SL": ("S", "L", False),
    "EVC_MM": ("M", "M", False),
    "EVC_SS": ("S", "S", False),
    "EVC_MS": ("M", "S", False),  # defined but unregistered in the official code; harmless to offer
    "Scale_EVC_SS": ("S", "S", True),
    "Scale_EVC_SL": ("S", "L", True),
}

#: one-byte architecture codes used in the bitstream header (255 = custom widths)
ARCH_CODES: dict[str, int] = {name: i for i, name in enumerate(ARCHS)}
ARCH_CODES["custom"] = 255

#: RD lambdas used by the scalable models to choose an encoder candidate (lambda * 255^2 * mse + bpp)
SCALE_LAMBDAS: tuple[float, float, float, float] = (0.0022, 0.0050, 0.012, 0.027)

#: q_scale anchors of a freshly built model. The official code initialises all anchors to 1.0 (trained checkpoints
#: carry their own values); we use distinct, log-spaced anchors so that a random-init model has 4 distinct rates.
#: Index 0 is the largest q_scale = the lowest rate.
DEFAULT_Q_SCALES: tuple[float, float, float, float] = (1.6, 1.1, 0.75, 0.5)



# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------
def make_encoder(widths: Sequence[int]) -> nn.Sequential:
    """Analysis transform 3 -> C4 at 1/16 resolution (reference 1.2)."""
    c1, c2, c3, c4 = widths
    return nn.Sequential(
        ResidualBlockWithStride(3, c1, stride=2),
        DepthConvBlock(c1, c1),
        ResidualBlockWithStride(c1, c2, stride=2),
        DepthConvBlock(c2, c2),
        ResidualBlockWithStride(c2, c3, stride=2),
        DepthConvBlock(c3, c3),
        conv3x3(c3, c4, stride=2),
    )


def make_decoder(widths: Sequence[int]) -> nn.Sequential:
    """Synthesis transform C4 at 1/16 -> 3 channels at full resolution (reference 1.3)."""
    c1, c2, c3, c4 = widths
    return nn.Sequential(
        DepthConvBlock(c4, c4),
        ResidualBlockUpsample(c4, c3, 2),
        DepthConvBlock(c3, c3),
        ResidualBlockUpsample(c3, c2, 2),
        DepthConvBlock(c2, c2),
        ResidualBlockUpsample(c2, c1, 2),
        DepthConvBlock(c1, c1),
        nn.Sequential(conv1x1(c1, 12), nn.PixelShuffle(2)),
    )


def _resolve_widths(w: str | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(w, str):
        if w not in WIDTHS:
            raise ValueError(f"unknown width preset {w!r}; expected one of {sorted(WIDTHS)}")
        return WIDTHS[w]
    t = tuple(int(v) for v in w)
    if len(t) != 4 or min(t) <= 0:
        raise ValueError(f"widths must be 4 positive integers, got {w!r}")
    return t  # type: ignore[return-value]


class EVC(nn.Module):
    """An EVC image codec with one analysis transform.

    Args:
        enc_widths: encoder widths [C1..C4] or a preset name "L"/"M"/"S".
        dec_widths: decoder widths [C1..C4] or a preset name.
        N: latent width (must equal C4 of both transforms); 192 in every official variant.
        anchor_num: number of learned q_scale anchors (4).
        name: architecture name recorded in bitstreams (``"custom"`` if the widths match no registered variant).
    """

    scalable = False

    def __init__(
        self,
        enc_widths: str | Sequence[int] = "L",
        dec_widths: str | Sequence[int] = "L",
        N: int = 192,
        anchor_num: int = 4,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.enc_widths = _resolve_widths(enc_widths)
        self.dec_widths = _resolve_widths(dec_widths)
        if self.enc_widths[3] != N or self.dec_widths[3] != N:
            raise ValueError(f"C4 of encoder {self.enc_widths} and decoder {self.dec_widths} must equal N={N}")
        if N % 2:
            raise ValueError("N must be even (the dual prior splits channels in halves)")
        self.N = N
        self.anchor_num = anchor_num
        self.name = name or name_for(self.enc_widths, self.dec_widths, N, self.scalable)
        self._build_encoder()
        self.dec = make_decoder(self.dec_widths)
        self.hyper_enc = nn.Sequential(
            PriorDepthConvBlock(N, N), conv3x3(N, N, stride=2), nn.LeakyReLU(0.01), conv3x3(N, N, stride=2)
        )
        self.hyper_dec = nn.Sequential(
            PriorDepthConvBlockUpsample(N, N), PriorDepthConvBlockUpsample(N, N), PriorDepthConvBlock(N, N)
        )
        self.y_prior_fusion = nn.Sequential(PriorDepthConvBlock(N, 2 * N), PriorDepthConvBlock(2 * N, 3 * N))
        self.y_spatial_prior = nn.Sequential(
            PriorDepthConvBlock(4 * N, 3 * N), PriorDepthConvBlock(3 * N, 2 * N), PriorDepthConvBlock(2 * N, 2 * N)
        )
        self.bit_estimator_z = BitEstimator(N)
        self.q_basic = nn.Parameter(torch.ones(1, N, 1, 1))
        init = _default_anchors(anchor_num)
        self.q_scale = nn.Parameter(torch.tensor(init, dtype=torch.float32).reshape(anchor_num, 1, 1, 1))

    # -- structure ------------------------------------------------------------------------------------------------
    def _build_encoder(self) -> None:
        self.enc = make_encoder(self.enc_widths)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this architecture."""
        return {
            "enc_widths": list(self.enc_widths),
            "dec_widths": list(self.dec_widths),
            "N": self.N,
            "anchor_num": self.anchor_num,
            "scalable": self.scalable,
            "name": self.name,
        }

    def decoder_side_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of everything the decoder needs, in a fixed order (used for the weights hash)."""
        keep = ("dec.", "hyper_dec.", "y_prior_fusion.", "y_spatial_prior.", "bit_estimator_z.", "q_basic")
        return [(k, v) for k, v in sorted(self.state_dict().items()) if k.startswith(keep)]

    # -- variable rate ---------------------------------------------------------------------------------------------
    def anchors(self) -> list[float]:
        """The learned q_scale anchors, index 0 = largest q_scale = lowest rate."""
        return [float(v) for v in self.q_scale.detach().flatten().cpu()]

    def curr_q(self, q_scale: float | torch.Tensor) -> torch.Tensor:
        """Per-channel quantisation step ``max(q_basic, 0.5) * q_scale`` (float32, shape (1,N,1,1))."""
        return torch.clamp_min(self.q_basic, 0.5) * q_scale

    # -- float path (training / speed) ---------------------------------------------------------------------------
    def analysis(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        """y = enc(x)."""
        return self.enc(x)

    def forward(self, x: torch.Tensor, q_scale: float | torch.Tensor = 1.0,
                quant: str = "round") -> dict[str, torch.Tensor]:
        """Float32 forward; returns x_hat (unclamped) and the estimated bits per image of y and z.

        ``quant="round"`` is hard rounding (like the official ``forward``); ``quant="ste"`` rounds with a
        straight-through gradient; ``quant="mixed"`` (our training default, see docs/evc_training.md) feeds the
        STE-rounded latents to the decoder and the spatial prior but estimates the rates on latent + U(-1/2, 1/2)
        noise. The official training proxy is not published. Rates are computed in float32 (also under autocast).
        This path is for training and speed work; coding uses :mod:`~maskdecay_examples.evc.coding.codec`, whose entropy parameters are
        computed with the exact (deterministic) path."""
        if quant in ("ste", "mixed"):
            def rnd(v: torch.Tensor) -> torch.Tensor:
                return v + (torch.round(v) - v).detach()
        elif quant == "round":
            rnd = torch.round
        else:
            raise ValueError(f"quant must be 'round', 'ste' or 'mixed', got {quant!r}")

        def rate_input(v: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
            if quant == "mixed":
                return v.float() + torch.empty_like(v, dtype=torch.float32).uniform_(-0.5, 0.5)
            return v_hat.float()
        curr_q = self.curr_q(q_scale)
        y = self.analysis(x) / curr_q
        z = self.hyper_enc(y)
        z_hat = rnd(z)
        params = self.y_prior_fusion(self.hyper_dec(z_hat))
        q_step, scales, means = params.chunk(3, 1)
        quant_step = torch.clamp_min(q_step, 0.5)
        yq = y / quant_step
        y0, y1 = yq.chunk(2, 1)
        s0, s1 = scales.chunk(2, 1)
        m0, m1 = means.chunk(2, 1)
        mask0, mask1 = checkerboard(y.shape[-2], y.shape[-1], y.device, y.dtype)
        mean_p1 = m0 * mask0 + m1 * mask1
        scale_p1 = s0 * mask0 + s1 * mask1
        r_p1 = y0 * mask0 + y1 * mask1 - mean_p1
        res_p1 = rnd(r_p1)
        yhat_p1 = res_p1 + mean_p1
        sp = self.y_spatial_prior(torch.cat([yhat_p1 * mask0, yhat_p1 * mask1, means, scales, quant_step], 1))
        ss0, mm0, ss1, mm1 = sp.chunk(4, 1)
        mean_p2 = mm0 * mask1 + mm1 * mask0
        scale_p2 = ss0 * mask1 + ss1 * mask0
        r_p2 = y0 * mask1 + y1 * mask0 - mean_p2
        res_p2 = rnd(r_p2)
        yhat_p2 = res_p2 + mean_p2
        y_hat = torch.cat([yhat_p1 * mask0 + yhat_p2 * mask1, yhat_p1 * mask1 + yhat_p2 * mask0], 1) * quant_step
        x_hat = self.dec(y_hat * curr_q)
        bits_y = (gaussian_bits(rate_input(r_p1, res_p1), scale_p1.float()).flatten(1).sum(1)
                  + gaussian_bits(rate_input(r_p2, res_p2), scale_p2.float()).flatten(1).sum(1))
        bits_z = factorized_bits(self.bit_estimator_z, rate_input(z, z_hat)).flatten(1).sum(1)
        return {"x_hat": x_hat, "bits_y": bits_y, "bits_z": bits_z}


class ScalableEVC(EVC):
    """EVC with ``enc_num`` small encoders whose running means form the candidate latents (reference 1.8).

    Keys: ``encs.{0..enc_num-1}.*`` instead of ``enc.*``. The decoder side is shared and nothing about the chosen
    encoder is signalled in the bitstream.
    """

    scalable = True

    def __init__(
        self,
        enc_widths: str | Sequence[int] = "S",
        dec_widths: str | Sequence[int] = "S",
        N: int = 192,
        anchor_num: int = 4,
        name: str | None = None,
        enc_num: int = 4,
    ) -> None:
        self.enc_num = enc_num
        super().__init__(enc_widths, dec_widths, N, anchor_num, name)

    def _build_encoder(self) -> None:
        self.enc = None  # type: ignore[assignment]
        self.encs = nn.ModuleList([make_encoder(self.enc_widths) for _ in range(self.enc_num)])

    @property
    def config(self) -> dict[str, Any]:
        cfg = super().config
        cfg["enc_num"] = self.enc_num
        return cfg

    def candidates(self, x: torch.Tensor, enc_id: int | None = None) -> torch.Tensor:
        """Candidate latents, shape (K, B, N, h, w): candidate i = mean of the first i+1 encoder outputs.
        With ``enc_id=k`` only encoders 0..k run and only candidate k is returned (K=1)."""
        last = self.enc_num - 1 if enc_id is None else int(enc_id)
        if not 0 <= last < self.enc_num:
            raise ValueError(f"enc_id must be in 0..{self.enc_num - 1}, got {enc_id}")
        outs = []
        acc = None
        for i in range(last + 1):
            yi = self.encs[i](x)
            acc = yi if acc is None else acc + yi
            outs.append(acc / (i + 1))
        if enc_id is not None:
            return outs[-1].unsqueeze(0)
        return torch.stack(outs, 0)

    def analysis(self, x: torch.Tensor, enc_id: int | None = None, **_: Any) -> torch.Tensor:
        """Float path: the last candidate (all encoders, or encoders 0..enc_id). Coding chooses by RD cost."""
        return self.candidates(x, enc_id)[-1]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Like ``nn.Module.load_state_dict``; a missing ``encs.i.*`` key falls back to ``enc.*`` (official rule)."""
        sd = dict(state_dict)
        has_enc = any(k.startswith("enc.") for k in sd)
        if has_enc:
            enc_items = {k[len("enc."):]: v for k, v in sd.items() if k.startswith("enc.")}
            for k in [k for k in sd if k.startswith("enc.")]:
                del sd[k]
            for i in range(self.enc_num):
                for sub, v in enc_items.items():
                    sd.setdefault(f"encs.{i}.{sub}", v)
        return super().load_state_dict(sd, strict=strict, assign=assign)


def checkerboard(h: int, w: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """mask_0 (1 where row+col is even) and mask_1 (odd), shape (1,1,h,w)."""
    r = torch.arange(h, device=device).view(h, 1)
    c = torch.arange(w, device=device).view(1, w)
    even = ((r + c) % 2 == 0).to(dtype).view(1, 1, h, w)
    return even, 1 - even


def _default_anchors(n: int) -> list[float]:
    if n == 4:
        return list(DEFAULT_Q_SCALES)
    if n == 1:
        return [1.0]
    hi, lo = DEFAULT_Q_SCALES[0], DEFAULT_Q_SCALES[-1]
    return [math.exp(math.log(hi) + (math.log(lo) - math.log(hi)) * i / (n - 1)) for i in range(n)]


def name_for(enc: Sequence[int], dec: Sequence[int], N: int, scalable: bool) -> str:
    """The registered name of these widths: ``EVC_SS`` etc., ``mini_EVC_SS`` etc. for the variants with every width
    divided by 4 (``zoo.build_model("mini_...")``), else ``"custom"``."""
    for div, prefix in ((1, ""), (4, "mini_")):
        inv = {tuple(w // div for w in v): k for k, v in WIDTHS.items()}
        if N == 192 // div and tuple(enc) in inv and tuple(dec) in inv:
            e, d = inv[tuple(enc)], inv[tuple(dec)]
            cand = ("Scale_" if scalable else "") + f"EVC_{e}{d}"
            if cand in ARCHS and ARCHS[cand][2] == scalable:
                return prefix + cand
    return "custom"
