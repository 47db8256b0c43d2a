"""EVC model family: 9 single-encoder variants, the scalable-encoder models, a registry and a checkpoint loader.

All facts (widths, module layout, parameter shapes, chunk orders) come from ``shared/reference/evc_official.md``;
the code is our own. State-dict keys match the official checkpoints, so ``load_state_dict(official, strict=True)``
works for every registered variant.

Widths are constructor arguments (``enc_widths``, ``dec_widths``, ``N``), so reduced families (e.g. a "mini"
family with every width divided by 4) can be built with the same classes and are recognised by :func:`load_model`.
"""
from __future__ import annotations

import io
import logging
import math
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .layers import (
    DepthConvBlock,
    PriorDepthConvBlock,
    PriorDepthConvBlockUpsample,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    conv1x1,
    conv3x3,
)

log = logging.getLogger(__name__)

__all__ = [
    "WIDTHS",
    "ARCHS",
    "ARCH_CODES",
    "SCALE_LAMBDAS",
    "DEFAULT_Q_SCALES",
    "Bitparm",
    "BitEstimator",
    "EVC",
    "ScalableEVC",
    "build_model",
    "infer_config",
    "extract_state_dict",
    "load_model",
    "save_model",
]

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
# factorized model for z
# ---------------------------------------------------------------------------------------------------------------
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
        self.name = name or _name_for(self.enc_widths, self.dec_widths, N, self.scalable)
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
        This path is for training and speed work; coding uses :mod:`evc.codec`, whose entropy parameters are
        computed with the exact (deterministic) path."""
        from .entropy import gaussian_bits, factorized_bits  # local import: avoid a cycle

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


def _name_for(enc: Sequence[int], dec: Sequence[int], N: int, scalable: bool) -> str:
    inv = {v: k for k, v in WIDTHS.items()}
    if N == 192 and tuple(enc) in inv and tuple(dec) in inv:
        e, d = inv[tuple(enc)], inv[tuple(dec)]
        cand = ("Scale_" if scalable else "") + f"EVC_{e}{d}"
        if cand in ARCHS and ARCHS[cand][2] == scalable:
            return cand
    return "custom"


def build_model(arch: str, **kwargs: Any) -> EVC:
    """Build a registered architecture with random weights, e.g. ``build_model("EVC_SS")``.

    Extra keyword arguments (``N``, ``anchor_num``, ``enc_num``) are passed to the constructor. ``arch`` may also be
    ``"mini_<name>"``: the same variant with every width (and N) divided by 4, for fast experiments.
    """
    div = 1
    base = arch
    if arch.startswith("mini_"):
        div, base = 4, arch[len("mini_"):]
    if base not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)} (optionally 'mini_' prefixed)")
    e, d, scalable = ARCHS[base]
    enc = [w // div for w in WIDTHS[e]]
    dec = [w // div for w in WIDTHS[d]]
    N = kwargs.pop("N", 192 // div)
    name = arch if div == 1 else "custom"
    cls = ScalableEVC if scalable else EVC
    return cls(enc, dec, N=N, name=name, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint loading
# ---------------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A file or dict that is not a usable EVC checkpoint."""


def extract_state_dict(obj: Any, prefer: str = "student") -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``net`` containers, strip ``module.`` and pick ``student.``/``teacher.`` sub-dicts.

    Args:
        obj: a loaded checkpoint object.
        prefer: which sub-model to use when both ``student.*`` and ``teacher.*`` keys are present.
    """
    for _ in range(3):
        if isinstance(obj, Mapping) and not _looks_like_sd(obj):
            for key in ("state_dict", "net", "model", "model_state_dict", "network"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError("checkpoint does not contain a state dict")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    prefixes = {p for p in ("student.", "teacher.") if any(k.startswith(p) for k in sd)}
    if prefixes:
        pick = f"{prefer}." if f"{prefer}." in prefixes else sorted(prefixes)[0]
        sub = {k[len(pick):]: v for k, v in sd.items() if k.startswith(pick)}
        # keys without a prefix (e.g. a shared q_scale) are kept unless the sub-dict has them
        for k, v in sd.items():
            if not k.startswith(("student.", "teacher.")):
                sub.setdefault(k, v)
        sd = sub
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError("checkpoint holds no tensors")
    return sd


def _looks_like_sd(d: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing key {key!r}")
    return tuple(sd[key].shape)


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer constructor arguments (widths, N, anchors, scalable, enc_num) from tensor shapes."""
    N = _shape(sd, "q_basic")[1]
    anchor_num = _shape(sd, "q_scale")[0]
    scalable = any(k.startswith("encs.") for k in sd)
    if scalable:
        enc_num = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("encs."))
        ep = "encs.0."
    else:
        enc_num = 0
        ep = "enc."
    enc = (
        _shape(sd, ep + "0.conv1.weight")[0],
        _shape(sd, ep + "2.conv1.weight")[0],
        _shape(sd, ep + "4.conv1.weight")[0],
        _shape(sd, ep + "6.weight")[0],
    )
    dec = (
        _shape(sd, "dec.5.conv.weight")[0],
        _shape(sd, "dec.3.conv.weight")[0],
        _shape(sd, "dec.1.conv.weight")[0],
        _shape(sd, "dec.0.block.0.conv1.0.weight")[0],
    )
    cfg: dict[str, Any] = {"enc_widths": enc, "dec_widths": dec, "N": N, "anchor_num": anchor_num,
                           "scalable": scalable}
    if scalable:
        cfg["enc_num"] = enc_num
    cfg["name"] = _name_for(enc, dec, N, scalable)
    return cfg


def _build_from_config(cfg: Mapping[str, Any]) -> EVC:
    kw = dict(enc_widths=cfg["enc_widths"], dec_widths=cfg["dec_widths"], N=cfg["N"],
              anchor_num=cfg["anchor_num"], name=cfg.get("name"))
    if cfg.get("scalable"):
        return ScalableEVC(enc_num=cfg.get("enc_num", 4), **kw)
    return EVC(**kw)


def load_model(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    arch: str | None = None,
    device: str | torch.device = "cpu",
    prefer: str = "student",
) -> EVC:
    """Load an EVC checkpoint (official or ours) and return the model in eval mode.

    Args:
        path_or_state_dict: a checkpoint path (loaded with ``weights_only=True``) or an already-loaded object.
        arch: a registered architecture name; None infers the variant from the tensor shapes.
        device: where to put the model.
        prefer: ``"student"`` or ``"teacher"`` for checkpoints holding both.

    Raises:
        ValueError (:class:`CheckpointError`): one clear message if the input is not a loadable EVC checkpoint.
    """
    src = "state dict"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        src = os.fspath(path_or_state_dict)
        if not os.path.isfile(src):
            raise CheckpointError(f"{src}: no such checkpoint file")
        try:
            obj = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{src}: not an EVC checkpoint ({msg[:200]})") from None
    else:
        obj = path_or_state_dict
    try:
        sd = extract_state_dict(obj, prefer=prefer)
        cfg = infer_config(sd) if arch is None else None
    except CheckpointError as e:
        raise CheckpointError(f"{src}: not an EVC checkpoint ({e})") from None
    dropped = [k for k in sd if _ignorable(k)]
    if dropped:
        log.warning("ignoring %d entropy-coder buffers in the checkpoint (e.g. %s); tables are rebuilt from the "
                    "weights", len(dropped), dropped[0])
        sd = {k: v for k, v in sd.items() if k not in dropped}
    if arch is None:
        model = _build_from_config(cfg)  # type: ignore[arg-type]
    else:
        model = build_model(arch, anchor_num=_shape(sd, "q_scale")[0] if "q_scale" in sd else 4)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        missing, unexpected, mism = _diff(model, sd)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if mism:
            parts.append(f"{len(mism)} shape mismatches (e.g. {mism[0]})")
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise CheckpointError(f"{src}: does not match architecture {model.name}: {detail}") from None
    model.to(device).eval()
    log.info("loaded %s (%s) from %s", model.name, "x".join(map(str, model.enc_widths)), src)
    return model


_IGNORABLE_PREFIXES = ("gaussian_encoder.", "entropy_coder.", "_evc_ctx.")
_IGNORABLE_SUFFIXES = ("_quantized_cdf", "_cdf_length", "_offset", "scale_table", "quantized_cdf", "cdf_length")


def _ignorable(key: str) -> bool:
    """Derived entropy-coder state (CDF tables, offsets, scale tables) that some checkpoints carry as buffers; we
    rebuild all of it from the weights, so such keys are not an architecture mismatch."""
    return key.startswith(_IGNORABLE_PREFIXES) or key.rsplit(".", 1)[-1].endswith(_IGNORABLE_SUFFIXES)


def _diff(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    if isinstance(model, ScalableEVC) and any(k.startswith("enc.") for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("enc.")}
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mism = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mism


def save_model(model: EVC, path: str | os.PathLike[str]) -> None:
    """Save ``{"state_dict": ..., "config": ...}`` atomically (loadable by :func:`load_model` and by the
    official ``get_state_dict`` convention)."""
    from .bitstream import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "config": model.config}, buf)
    atomic_write_bytes(path, buf.getvalue())
