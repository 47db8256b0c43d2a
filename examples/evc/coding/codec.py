"""Image <-> .evc stream with an EVC model: padding, variable rate, the dual-prior coding loop, image I/O.

The same dual-prior routine runs in three modes: *write* (encoder), *read* (decoder) and *estimate* (the model's own
quantised forward pass, no entropy coding). All entropy parameters come from the exact float64 twins of the prior
networks (:mod:`evc.exact`), so the three modes agree bit for bit on every symbol, scale index and mean, whatever
the thread count, batch size or process.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import bitstream as bs
from .entropy import (
    SymbolReader,
    SymbolWriter,
    StreamError,
    factorized_tables,
    gaussian_bits,
    gaussian_tables,
    scale_to_index,
    tables_crc,
)
from .exact import ExactNet
from .models import ARCH_CODES, SCALE_LAMBDAS, EVC, ScalableEVC, checkerboard

log = logging.getLogger(__name__)

__all__ = [
    "PAD",
    "ReferenceEngine",
    "RateSpec",
    "select_rate",
    "EncodeResult",
    "DecodeResult",
    "compress",
    "decompress",
    "reconstruct",
    "load_image",
    "save_image",
    "pad_image",
    "weights_hash",
]

PAD = 64
#: default limit of :func:`decompress` on the declared image size (8192 x 8192)
MAX_DECODE_PIXELS = 1 << 26


# ---------------------------------------------------------------------------------------------------------------
# per-model cached coding context
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Context:
    key: tuple
    weights_hash: bytes
    z_tables: tuple
    y_tables: tuple
    tables_crc: int
    hyper_dec: ExactNet
    fusion: ExactNet
    spatial: ExactNet
    synthesis: ExactNet


def _state_key(model: EVC) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters()) + (str(next(model.parameters()).device),)


def weights_hash(model: EVC) -> bytes:
    """First 8 bytes of SHA-256 over the decoder-side tensors (name, shape, float32 little-endian bytes)."""
    h = hashlib.sha256()
    for name, t in model.decoder_side_parameters():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.digest()[:8]


def _context(model: EVC) -> _Context:
    key = _state_key(model)
    ctx = getattr(model, "_evc_ctx", None)
    if ctx is not None and ctx.key == key:
        return ctx
    zt = factorized_tables(model.bit_estimator_z)
    yt = gaussian_tables()
    ctx = _Context(
        key=key,
        weights_hash=weights_hash(model),
        z_tables=zt,
        y_tables=yt,
        tables_crc=tables_crc(zt + yt),
        hyper_dec=ExactNet(model.hyper_dec),
        fusion=ExactNet(model.y_prior_fusion),
        spatial=ExactNet(model.y_spatial_prior),
        synthesis=ExactNet(model.dec),
    )
    object.__setattr__(model, "_evc_ctx", ctx)
    return ctx


class ReferenceEngine:
    """The plain inference path: the model's own float32 modules (eager) for the analysis, ``hyper_enc`` and the
    float synthesis, and the exact float64 twins of :mod:`evc.exact` for the entropy parameters and the exact
    synthesis. :class:`evc.fast.FastEngine` has the same interface."""

    def __init__(self, model: EVC) -> None:
        self.model = model
        self.key = _state_key(model)

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
        ctx = _context(self.model)
        return ctx.fusion(ctx.hyper_dec(z_hat64))

    def spatial(self, inp: torch.Tensor) -> torch.Tensor:
        """Exact ``y_spatial_prior`` in float64."""
        return _context(self.model).spatial(inp)

    def synthesis(self, y64: torch.Tensor, exact: bool) -> torch.Tensor:
        """Image (before clamping) from the dequantised latent: exact float64 twin, or the float32 ``dec``."""
        if exact:
            return _context(self.model).synthesis(y64)
        return self.model.dec(y64.to(torch.float32))


def _engine(model: EVC, engine: "ReferenceEngine | None") -> "ReferenceEngine":
    if engine is None:
        return ReferenceEngine(model)
    if engine.model is not model or engine.key != _state_key(model):
        raise ValueError("the engine was built for another model or for weights that have changed since: rebuild it")
    return engine


# ---------------------------------------------------------------------------------------------------------------
# variable rate
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateSpec:
    """A resolved rate: the float32 q_scale used by encoder and decoder, the anchor index (255 if none) and the
    RD lambda used by the scalable models to pick an encoder candidate."""

    q_scale: float
    rate_index: int
    lam: float


def _f32(v: float) -> float:
    return float(np.float32(v))


def _interp_log(values: list[float], t: float) -> float:
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
        if not (q_scale > 0 and math.isfinite(q_scale)):
            raise ValueError(f"q_scale must be a positive number, got {q_scale}")
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
        return RateSpec(_f32(q_scale), 255, _interp_log(lams, t))
    if q is None:
        q = 1.0
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"q must be in [0, 1], got {q}")
    t = q * (n - 1)
    idx = int(round(t)) if abs(t - round(t)) < 1e-9 else 255
    if idx != 255:
        return RateSpec(_f32(anchors[idx]), idx, lams[idx])
    return RateSpec(_f32(_interp_log(anchors, t)), 255, _interp_log(lams, t))


# ---------------------------------------------------------------------------------------------------------------
# the dual-prior coding loop
# ---------------------------------------------------------------------------------------------------------------
CodeFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _curr_q64(model: EVC, q_scale: float) -> torch.Tensor:
    return torch.clamp_min(model.q_basic.detach().to(torch.float64), 0.5) * float(q_scale)


def _prior(eng: ReferenceEngine, z_hat64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = eng.prior(z_hat64)
    q_step, scales, means = params.chunk(3, 1)
    return q_step, scales, means


def _dual_prior(eng: ReferenceEngine, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor], y2: torch.Tensor | None,
                code: CodeFn) -> torch.Tensor:
    """Two-pass dual spatial prior. ``y2`` = y / curr_q in float64 (None when decoding). ``code(residual, scales)``
    codes/decodes/estimates one pass and returns the integer symbols as float64. Returns y_hat / curr_q."""
    q_step, scales, means = params
    quant_step = torch.clamp_min(q_step, 0.5)
    h, w = quant_step.shape[-2:]
    mask0, mask1 = checkerboard(h, w, quant_step.device, torch.float64)
    s0, s1 = scales.chunk(2, 1)
    m0, m1 = means.chunk(2, 1)
    if y2 is not None:
        yq = y2 / quant_step
        y0, y1 = yq.chunk(2, 1)
    mean_p1 = m0 * mask0 + m1 * mask1
    scale_p1 = s0 * mask0 + s1 * mask1
    res_p1 = torch.round(y0 * mask0 + y1 * mask1 - mean_p1) if y2 is not None else None
    yhat_p1 = code(res_p1, scale_p1) + mean_p1
    sp = eng.spatial(torch.cat([yhat_p1 * mask0, yhat_p1 * mask1, means, scales, quant_step], 1))
    ss0, mm0, ss1, mm1 = sp.chunk(4, 1)
    mean_p2 = mm0 * mask1 + mm1 * mask0
    scale_p2 = ss0 * mask1 + ss1 * mask0
    res_p2 = torch.round(y0 * mask1 + y1 * mask0 - mean_p2) if y2 is not None else None
    yhat_p2 = code(res_p2, scale_p2) + mean_p2
    y_hat = torch.cat([yhat_p1 * mask0 + yhat_p2 * mask1, yhat_p1 * mask1 + yhat_p2 * mask0], 1)
    return y_hat * quant_step


def _z_index(z: torch.Tensor) -> np.ndarray:
    b, c, h, w = z.shape
    return np.broadcast_to(np.arange(c).reshape(1, c, 1, 1), (b, c, h, w))


def pad_image(x: torch.Tensor, multiple: int = PAD) -> torch.Tensor:
    """Zero-pad (right/bottom) to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an image tensor of shape (B,3,H,W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("image contains NaN/inf")


@torch.no_grad()
def _estimate(model: EVC, eng: ReferenceEngine, y: torch.Tensor, q_scale: float) -> dict[str, torch.Tensor]:
    """Quantised forward from latents y (B,N,h,w): y_hat/curr_q, per-sample estimated bits and ideal z."""
    curr_q = _curr_q64(model, q_scale)
    y2 = y.to(torch.float64) / curr_q
    z_hat = torch.round(eng.hyper_enc(y2.to(torch.float32))).to(torch.float64)
    bits_z = _z_bits(model, z_hat)
    params = _prior(eng, z_hat)
    bits_y = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)

    def est(res: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
        nonlocal bits_y
        bits_y = bits_y + gaussian_bits(res, scales).flatten(1).sum(1)
        return res

    y_hat = _dual_prior(eng, params, y2, est)
    return {"y_hat": y_hat, "curr_q": curr_q, "bits_y": bits_y, "bits_z": bits_z, "z_hat": z_hat}


def _z_bits(model: EVC, z_hat64: torch.Tensor) -> torch.Tensor:
    be = model.bit_estimator_z
    zf = z_hat64.to(torch.float32)
    p = (be(zf + 0.5) - be(zf - 0.5)).to(torch.float64)
    return torch.clamp_min(-torch.log2(p + 1e-5), 0.0).flatten(1).sum(1)


def _synth(eng: ReferenceEngine, y_hat64: torch.Tensor, curr_q: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Synthesis of y_hat. ``exact=True`` (default) uses the exact float64 twin, so the decoded image is identical
    for any thread count / process; ``exact=False`` is the faster float path (last-bit differences possible)."""
    if exact:
        return eng.synthesis(y_hat64 * curr_q, True).clamp_(0.0, 1.0).to(torch.float32)
    return eng.synthesis(y_hat64 * curr_q, False).clamp_(0.0, 1.0)


def _choose(model: ScalableEVC, eng: ReferenceEngine, cands: torch.Tensor, xp: torch.Tensor,
            rate: RateSpec) -> int:
    """RD choice among candidates (reference 1.8): cost = lam*255^2*mse_sum_over_channels + bpp (padded pixels)."""
    k = cands.shape[0]
    if k == 1:
        return 0
    est = _estimate(model, eng, cands[:, 0], rate.q_scale)
    x_hat = _synth(eng, est["y_hat"], est["curr_q"], exact=False)
    pix = xp.shape[-1] * xp.shape[-2]
    mse = ((x_hat - xp.expand_as(x_hat)) ** 2).sum(1).mean((1, 2)).to(torch.float64)
    bpp = (est["bits_y"] + est["bits_z"]) / pix
    cost = rate.lam * 255.0 ** 2 * mse + bpp
    return int(torch.argmin(cost))


@dataclass
class EncodeResult:
    """Output of :func:`compress`."""

    data: bytes
    height: int
    width: int
    rate: RateSpec
    est_bits: float  # model's continuous estimate (official formula), padded area
    ideal_bits: float  # exact information content under the coding tables
    num_symbols: int
    times: dict[str, float] = field(default_factory=dict)
    enc_choice: int | None = None
    x_hat: torch.Tensor | None = None

    @property
    def bpp(self) -> float:
        """Bits per (unpadded) pixel of the whole stream, header and CRC included (= file size * 8 / pixels)."""
        return len(self.data) * 8.0 / (self.height * self.width)


@dataclass
class DecodeResult:
    """Output of :func:`decompress`."""

    x_hat: torch.Tensor
    header: bs.Header
    times: dict[str, float] = field(default_factory=dict)
    y_hat: torch.Tensor | None = None  # decoded latent / curr_q (float64), for inspection


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Coder:
    """The encoder's symbol writes, in stream order: inline, or on one CPU thread while the device runs the next
    networks (``overlap``). On CUDA, overlapped jobs get their host copies from non-blocking transfers followed by
    a CUDA event, so the thread waits for exactly the tensors it codes, not for the networks queued after them.
    ``busy`` sums the time spent writing (the CPU cost of the entropy coding, waits excluded)."""

    def __init__(self, dev: torch.device, overlap: bool) -> None:
        self.writer = SymbolWriter()
        self.dev = dev
        self.busy = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="evc-coder") if overlap else None
        self._jobs: list[Future] = []

    def __enter__(self) -> "_Coder":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def write(self, values: torch.Tensor, idx: torch.Tensor | np.ndarray, tables: Sequence) -> None:
        """Queue the symbols ``values`` (integer-valued, any float or int dtype) with their table indices."""
        if self._pool is None:
            _sync(self.dev)
            t = time.perf_counter()
            self._write(values, idx, tables)
            self.busy += time.perf_counter() - t
            return
        ready = None
        if self.dev.type == "cuda":
            values = values.to("cpu", non_blocking=True)
            if isinstance(idx, torch.Tensor):
                idx = idx.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:  # CPU tensors are computed already; snapshot them against later in-place use
            values = values.clone()
            if isinstance(idx, torch.Tensor):
                idx = idx.clone()
        self._jobs.append(self._pool.submit(self._job, values, idx, tables, ready))

    def _job(self, values: torch.Tensor, idx: torch.Tensor | np.ndarray, tables: Sequence,
             ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()
        t = time.perf_counter()
        self._write(values, idx, tables)
        self.busy += time.perf_counter() - t  # one worker thread: no concurrent update

    def _write(self, values: torch.Tensor, idx: torch.Tensor | np.ndarray, tables: Sequence) -> None:
        idx_np = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        self.writer.write(values.cpu().numpy().astype(np.int64), idx_np, tables)

    def finish(self) -> bytes:
        """Wait for the queued writes (re-raising their errors) and return the entropy-coded payload."""
        for job in self._jobs:
            job.result()
        t = time.perf_counter()
        payload = self.writer.finish()
        self.busy += time.perf_counter() - t
        return payload


@torch.no_grad()
def compress(model: EVC, x: torch.Tensor, rate: RateSpec, enc_id: int | None = None, flags: int = 0,
             return_recon: bool = False, engine: ReferenceEngine | None = None,
             overlap: bool | None = None) -> EncodeResult:
    """Encode one image ``x`` (1,3,H,W) in [0,1] to bytes.

    Args:
        model: an EVC model (eval mode).
        x: image tensor on the model's device.
        rate: from :func:`select_rate`.
        enc_id: scalable models only: use encoders 0..enc_id (no RD choice).
        flags: header flags (bitstream.FLAG_*).
        return_recon: also synthesise the reconstruction (not part of the timed encoder).
        engine: the networks to run (default :class:`ReferenceEngine`; :class:`evc.fast.FastEngine` is faster and
            gives the same entropy parameters).
        overlap: entropy-code on a CPU thread while the device computes the next entropy parameters (the stream is
            the same either way). Default: on CUDA devices, whose networks run asynchronously; on the CPU the
            coder would compete with the networks for the same cores (it works there, mainly for testing).
            ``times["entropy_coding"]`` is the coding time left on the critical path; with overlap,
            ``times["entropy_coding_cpu"]`` is its CPU time.
    """
    _check_input(x)
    if x.shape[0] != 1:
        raise ValueError("compress codes one image at a time")
    dev = x.device
    ctx = _context(model)
    eng = _engine(model, engine)
    H, W = x.shape[-2:]
    times: dict[str, float] = {}
    _sync(dev)
    t0 = time.perf_counter()
    xp = pad_image(x)
    cands = eng.latents(xp, enc_id)
    choice = None
    if cands.shape[0] > 1:
        choice = _choose(model, eng, cands, xp, rate)  # type: ignore[arg-type]
    y = cands[choice] if choice is not None else cands[-1]
    curr_q = _curr_q64(model, rate.q_scale)
    y2 = y.to(torch.float64) / curr_q
    z_hat = torch.round(eng.hyper_enc(y2.to(torch.float32))).to(torch.float64)
    if not (bool(torch.isfinite(y2).all()) and bool(torch.isfinite(z_hat).all())):
        raise ValueError("the model's latents are not finite (NaN or inf): these weights cannot code an image "
                         "(a diverged or corrupted checkpoint)")
    _sync(dev)
    t1 = time.perf_counter()
    times["analysis"] = t1 - t0
    overlap = dev.type == "cuda" if overlap is None else bool(overlap)
    est_y: list[torch.Tensor] = []
    with _Coder(dev, overlap) as coder:
        coder.write(z_hat, _z_index(z_hat), ctx.z_tables)
        params = _prior(eng, z_hat)

        def enc(res: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
            assert res is not None
            est_y.append(gaussian_bits(res, scales).sum())  # converted at the end: no device sync in the loop
            coder.write(res, scale_to_index(scales), ctx.y_tables)
            return res

        y_hat = _dual_prior(eng, params, y2, enc)
        _sync(dev)
        t_net = time.perf_counter()
        payload = coder.finish()
    hdr = bs.Header(flags, ARCH_CODES.get(model.name, 255), ctx.weights_hash, ctx.tables_crc, int(H), int(W),
                    rate.q_scale, rate.rate_index)
    data = bs.pack(hdr, payload)
    _sync(dev)
    t2 = time.perf_counter()
    if overlap:
        times["entropy_coding"] = t2 - t_net
        times["entropy_coding_cpu"] = coder.busy
    else:
        times["entropy_coding"] = coder.busy
    times["prior"] = (t2 - t1) - times["entropy_coding"]
    times["total"] = t2 - t0
    writer = coder.writer
    est_bits = sum((float(b) for b in est_y), 0.0) + float(_z_bits(model, z_hat).sum())
    x_hat = None
    if return_recon:
        x_hat = _synth(eng, y_hat, curr_q)[..., :H, :W]
    return EncodeResult(data, int(H), int(W), rate, est_bits, writer.ideal_bits, writer.num_symbols, times,
                        choice, x_hat)


@torch.no_grad()
def decompress(model: EVC, data: bytes, device: torch.device | str | None = None,
               max_pixels: int = MAX_DECODE_PIXELS, exact_synthesis: bool = True,
               engine: ReferenceEngine | None = None) -> DecodeResult:
    """Decode a stream produced by :func:`compress` with the same (decoder-side) weights.

    ``max_pixels`` refuses streams that declare larger images (protects memory against hostile headers).
    ``exact_synthesis=False`` uses the float32 synthesis (faster; the image may then differ in the last bit
    between thread counts, while the decoded latents stay identical). ``engine``: as in :func:`compress`; every
    engine decodes every stream, and the exact synthesis gives the same image with every engine.

    Raises:
        bitstream.BitstreamError: corrupt stream, wrong version, or a model that does not match the stream.
    """
    hdr, payload = bs.unpack(data)
    if hdr.width * hdr.height > max_pixels:
        raise bs.BitstreamError(f"image {hdr.width}x{hdr.height} exceeds the decoder limit of {max_pixels} pixels")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = _context(model)
    eng = _engine(model, engine)
    if hdr.weights_hash != ctx.weights_hash:
        inv = {v: k for k, v in ARCH_CODES.items()}
        raise bs.BitstreamError(
            f"stream was encoded with {inv.get(hdr.arch_code, 'an unknown model')} weights {hdr.weights_hash.hex()}, "
            f"but the given model is {model.name} with weights {ctx.weights_hash.hex()}: use the encoder's checkpoint")
    if hdr.tables_crc != ctx.tables_crc:
        raise bs.BitstreamError("entropy tables differ from the encoder's (same weights, different numerics?)")
    times: dict[str, float] = {}
    _sync(dev)
    t0 = time.perf_counter()
    Hp = hdr.height + (-hdr.height) % PAD
    Wp = hdr.width + (-hdr.width) % PAD
    N = model.N
    try:
        reader = SymbolReader(payload)
    except StreamError as e:
        raise bs.BitstreamError(str(e)) from None
    t_code = 0.0
    tc = time.perf_counter()
    zshape = (1, N, Hp // 64, Wp // 64)
    try:
        z = reader.read(_z_index(torch.empty(zshape, device="meta")), ctx.z_tables)
    except StreamError as e:
        raise bs.BitstreamError(str(e)) from None
    t_code += time.perf_counter() - tc
    z_hat = torch.from_numpy(z.astype(np.float64)).to(dev)
    params = _prior(eng, z_hat)

    def dec(res: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
        nonlocal t_code
        idx = scale_to_index(scales)
        _sync(dev)
        tcc = time.perf_counter()
        try:
            v = reader.read(idx.cpu().numpy(), ctx.y_tables)
        except StreamError as e:
            raise bs.BitstreamError(str(e)) from None
        t_code += time.perf_counter() - tcc
        return torch.from_numpy(v.astype(np.float64)).to(dev)

    y_hat = _dual_prior(eng, params, None, dec)
    if not reader.is_empty():
        raise bs.BitstreamError("corrupt payload (entropy decoder did not end in its initial state)")
    _sync(dev)
    t1 = time.perf_counter()
    curr_q = _curr_q64(model, hdr.q_scale)
    x_hat = _synth(eng, y_hat, curr_q, exact_synthesis)[..., :hdr.height, :hdr.width]
    _sync(dev)
    t2 = time.perf_counter()
    times["entropy_coding"] = t_code
    times["prior"] = (t1 - t0) - t_code
    times["synthesis"] = t2 - t1
    times["total"] = t2 - t0
    return DecodeResult(x_hat, hdr, times, y_hat)


@torch.no_grad()
def reconstruct(model: EVC, x: torch.Tensor, rate: RateSpec, enc_id: int | None = None,
                engine: ReferenceEngine | None = None) -> dict[str, torch.Tensor]:
    """The model's own quantised forward pass (no entropy coding): reconstruction and estimated bits.

    Uses the same exact entropy-parameter path as :func:`compress`, so ``x_hat`` equals what the decoder produces.
    Works on batches; bits are per image over the padded area. ``engine``: as in :func:`compress`."""
    _check_input(x)
    eng = _engine(model, engine)
    H, W = x.shape[-2:]
    xp = pad_image(x)
    cands = eng.latents(xp, enc_id)
    if cands.shape[0] > 1:
        ys = []
        for b in range(x.shape[0]):
            c = _choose(model, eng, cands[:, b:b + 1], xp[b:b + 1], rate)  # type: ignore[arg-type]
            ys.append(cands[c, b:b + 1])
        y = torch.cat(ys, 0)
    else:
        y = cands[-1]
    est = _estimate(model, eng, y, rate.q_scale)
    x_hat = _synth(eng, est["y_hat"], est["curr_q"])[..., :H, :W]
    return {"x_hat": x_hat, "y_hat": est["y_hat"], "bits": est["bits_y"] + est["bits_z"],
            "bits_y": est["bits_y"], "bits_z": est["bits_z"]}


# ---------------------------------------------------------------------------------------------------------------
# image I/O
# ---------------------------------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int, str | None]:
    """Read an image as (1,3,H,W) float32 in [0,1]. Greyscale and alpha inputs are converted to RGB.

    Returns (tensor, header flags, note or None)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            flags = 0
            note = None
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / (65535.0 if arr.max() > 255 else 255.0), 0, 1)
                arr = (arr * 255.0 + 0.5).astype(np.uint8)
                im2 = Image.fromarray(arr, "L")
                mode = "L"
            else:
                im2 = im
            if mode in ("L", "LA", "1", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La"):
                has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in im2.info)
                grey = mode in ("L", "LA", "1", "La")
                if grey:
                    flags |= bs.FLAG_GREY
                if has_alpha:
                    flags |= bs.FLAG_ALPHA
                parts = []
                if grey:
                    parts.append("greyscale replicated to RGB")
                if has_alpha:
                    parts.append("alpha channel dropped")
                if not parts:
                    parts.append(f"mode {mode} converted to RGB")
                note = f"{os.fspath(path)}: " + ", ".join(parts)
                im2 = im2.convert("RGB")
            elif mode != "RGB":
                raise ValueError(f"unsupported image mode {mode}")
            arr = np.asarray(im2, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{os.fspath(path)}: cannot read image ({e.__class__.__name__})") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
    return x, flags, note


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1,3,H,W) float in [0,1] -> HxWx3 uint8 (round half up after clamping)."""
    a = torch.clamp(x[0], 0, 1).mul(255.0).add(0.5).floor().to(torch.uint8)
    return a.permute(1, 2, 0).cpu().numpy()


def save_image(path: str | os.PathLike[str], x: torch.Tensor) -> None:
    """Write (1,3,H,W) in [0,1] as an 8-bit RGB image, atomically. The format follows the extension (PNG default)."""
    from PIL import Image

    im = Image.fromarray(to_uint8(x), "RGB")
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM",
           ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(ext, "PNG")
    buf = io.BytesIO()
    kw = {"quality": 100} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=fmt, **kw)
    bs.atomic_write_bytes(path, buf.getvalue())
