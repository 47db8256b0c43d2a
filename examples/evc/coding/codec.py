"""Image <-> .evc stream with an EVC model: padding, the dual-prior coding loop, the per-model coding context.

The same dual-prior routine runs in three modes: *write* (encoder), *read* (decoder) and *estimate* (the model's own
quantised forward pass, no entropy coding). All entropy parameters come from the exact float64 networks of the
engine (:mod:`~maskdecay_examples.evc.engines`), so the three modes agree bit for bit on every symbol, scale index
and mean, whatever the engine, thread count, batch size or process.

One module on purpose (a little over 500 lines): the three modes share one loop, and splitting the loop from the
encode/decode entry points that drive it would spread one protocol over several files.
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engines.base import Engine, ModelCache, state_key
from ..engines.reference import ReferenceEngine
from ..models.architectures import ARCH_CODES, EVC, ScalableEVC, checkerboard
from ..models.bottleneck import gaussian_bits
from . import bitstream as bs
from .entropy import (
    MAX_ABS_SYMBOL,
    StreamError,
    SymbolReader,
    SymbolWriter,
    Table,
    factorized_tables,
    gaussian_tables,
    scale_to_index,
    tables_crc,
)
from .limits import MAX_DECODE_MEMORY, MAX_DECODE_PIXELS, PAD, decode_memory_estimate, min_payload_bits
from .rate import RateSpec, curr_q64

log = logging.getLogger(__name__)

__all__ = ["PAD", "MAX_DECODE_PIXELS", "MAX_DECODE_MEMORY", "CodingContext", "coding_context", "weights_hash",
           "compress", "decompress", "reconstruct", "EncodeResult", "DecodeResult", "pad_image", "check_enc_id",
           "decode_memory_estimate", "min_payload_bits"]

# ---------------------------------------------------------------------------------------------------------------
# per-model coding context
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodingContext:
    """What encoder and decoder derive from a model's weights before coding: the header's weights hash and the
    entropy-coding tables with their CRC."""

    weights_hash: bytes
    z_tables: tuple[Table, ...]
    y_tables: tuple[Table, ...]
    tables_crc: int


def weights_hash(model: EVC) -> bytes:
    """First 8 bytes of SHA-256 over the decoder-side tensors (name, shape, float32 little-endian bytes)."""
    h = hashlib.sha256()
    for name, t in model.decoder_side_parameters():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.digest()[:8]


def _build_context(model: nn.Module) -> CodingContext:
    zt = factorized_tables(model.bit_estimator_z)
    yt = gaussian_tables()
    return CodingContext(weights_hash(model), zt, yt, tables_crc(zt + yt))


#: one context per model and weights (building the z tables evaluates the model's CDF)
_CONTEXTS: ModelCache[CodingContext] = ModelCache(_build_context)


def coding_context(model: EVC) -> CodingContext:
    """The :class:`CodingContext` of ``model``'s current weights (cached)."""
    return _CONTEXTS.get(model)


def check_enc_id(model: EVC, enc_id: int | None) -> None:
    """``enc_id`` only for scalable models, and within their encoder count; raises ValueError otherwise."""
    if enc_id is None:
        return
    if not isinstance(model, ScalableEVC):
        raise ValueError(f"enc_id applies to scalable models only; {model.name} has a single encoder")
    if not 0 <= int(enc_id) < model.enc_num:
        raise ValueError(f"enc_id must be in 0..{model.enc_num - 1}, got {enc_id}")


def _engine(model: EVC, engine: Engine | None) -> Engine:
    if engine is None:
        return ReferenceEngine(model)
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must implement the Engine interface, got {type(engine).__name__}")
    if engine.model is not model or engine.key != state_key(model):
        raise ValueError("the engine was built for another model or for weights that have changed since: rebuild it")
    return engine


# ---------------------------------------------------------------------------------------------------------------
# the dual-prior coding loop
# ---------------------------------------------------------------------------------------------------------------
CodeFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _prior(eng: Engine, z_hat64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = eng.prior(z_hat64)
    q_step, scales, means = params.chunk(3, 1)
    return q_step, scales, means


def _dual_prior(eng: Engine, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor], y2: torch.Tensor | None,
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
def _estimate(model: EVC, eng: Engine, y: torch.Tensor, q_scale: float) -> dict[str, torch.Tensor]:
    """Quantised forward from latents y (B,N,h,w): y_hat/curr_q, per-sample estimated bits and ideal z."""
    curr_q = curr_q64(model, q_scale)
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


def _synth(eng: Engine, y_hat64: torch.Tensor, curr_q: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """Synthesis of y_hat. ``exact=True`` (default) uses the exact float64 twin, so the decoded image is identical
    for any thread count / process; ``exact=False`` is the faster float path (last-bit differences possible)."""
    if exact:
        return eng.synthesis(y_hat64 * curr_q, True).clamp_(0.0, 1.0).to(torch.float32)
    return eng.synthesis(y_hat64 * curr_q, False).clamp_(0.0, 1.0)


def _choose(model: ScalableEVC, eng: Engine, cands: torch.Tensor, xp: torch.Tensor,
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
        self.writer.write(values.cpu().numpy(), idx_np, tables)  # the writer checks the range before casting

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
             return_recon: bool = False, engine: Engine | None = None,
             overlap: bool | None = None) -> EncodeResult:
    """Encode one image ``x`` (1,3,H,W) in [0,1] to bytes.

    Args:
        model: an EVC model (eval mode).
        x: image tensor on the model's device.
        rate: from :func:`select_rate`.
        enc_id: scalable models only: use encoders 0..enc_id (no RD choice).
        flags: header flags (bitstream.FLAG_*).
        return_recon: also synthesise the reconstruction (not part of the timed encoder).
        engine: the networks to run (default :class:`~maskdecay_examples.evc.engines.reference.ReferenceEngine`;
            :class:`~maskdecay_examples.evc.engines.fast.FastEngine` is faster and
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
    check_enc_id(model, enc_id)
    dev = x.device
    ctx = coding_context(model)
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
    curr_q = curr_q64(model, rate.q_scale)
    y2 = y.to(torch.float64) / curr_q
    z_hat = torch.round(eng.hyper_enc(y2.to(torch.float32))).to(torch.float64)
    if not (bool(torch.isfinite(y2).all()) and bool(torch.isfinite(z_hat).all())):
        raise ValueError(f"the latents at q_scale {rate.q_scale:g} are not finite (NaN or inf): the q_scale is far "
                         "too small, or the weights are diverged or corrupt")
    if float(y2.abs().max()) >= MAX_ABS_SYMBOL / 2 or float(z_hat.abs().max()) >= MAX_ABS_SYMBOL / 2:
        raise ValueError(f"q_scale {rate.q_scale:g} is too small for this image: the latents exceed the codable "
                         "range (|symbol| < 2^29)")
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
               engine: Engine | None = None, max_memory: int = MAX_DECODE_MEMORY) -> DecodeResult:
    """Decode a stream produced by :func:`compress` with the same (decoder-side) weights.

    Hostile headers are refused before any network runs: ``max_pixels`` bounds the declared image size,
    ``max_memory`` (bytes) bounds the estimated peak memory (:func:`decode_memory_estimate`), and a payload shorter
    than the fewest bits the declared size needs (:func:`min_payload_bits`) is refused. The entropy parameters are
    always exact, so every stream decodes to the same latents everywhere. ``exact_synthesis=True`` (default here,
    so that the image equals :func:`reconstruct`'s) draws the picture with the exact float64 twin, identical for
    every thread count, engine and machine (bit-exact conformance); ``exact_synthesis=False`` uses the faster
    float32 synthesis (the default of ``evc decode`` and ``evc eval``; last-bit differences possible).
    ``engine``: as in :func:`compress`.

    Raises:
        bitstream.BitstreamError: corrupt stream, wrong version, a model that does not match the stream, or a
        declared size above the limits.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    hdr, payload = bs.unpack(bytes(data))
    if hdr.width * hdr.height > max_pixels:
        raise bs.BitstreamError(f"image {hdr.width}x{hdr.height} exceeds the decoder limit of {max_pixels} pixels "
                                "(raise it with max_pixels / --max-pixels)")
    need = decode_memory_estimate(model, hdr.height, hdr.width, exact_synthesis,
                                  engine is None or isinstance(engine, ReferenceEngine))
    if need > max_memory:
        raise bs.BitstreamError(f"decoding {hdr.width}x{hdr.height} with {model.name} needs about "
                                f"{need / 2 ** 30:.1f} GiB, above the limit of {max_memory / 2 ** 30:.1f} GiB "
                                "(raise it with max_memory / --max-memory GIB)")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = coding_context(model)
    eng = _engine(model, engine)
    if hdr.weights_hash != ctx.weights_hash:
        inv = {v: k for k, v in ARCH_CODES.items()}
        raise bs.BitstreamError(
            f"stream was encoded with {inv.get(hdr.arch_code, 'an unknown model')} weights {hdr.weights_hash.hex()}, "
            f"but the given model is {model.name} with weights {ctx.weights_hash.hex()}: use the encoder's checkpoint")
    if hdr.tables_crc != ctx.tables_crc:
        raise bs.BitstreamError("entropy tables differ from the encoder's (same weights, different numerics?)")
    if len(payload) * 8 < min_payload_bits(ctx.z_tables, ctx.y_tables, model, hdr.height, hdr.width):
        raise bs.BitstreamError(f"corrupt stream (a {hdr.width}x{hdr.height} image needs more than the "
                                f"{len(payload)} payload bytes)")
    times: dict[str, float] = {}
    _sync(dev)
    t0 = time.perf_counter()
    Hp = hdr.height + (-hdr.height) % PAD
    Wp = hdr.width + (-hdr.width) % PAD
    N = model.N
    try:
        reader = SymbolReader(payload)
    except (StreamError, ValueError) as e:  # constriction refuses some word sequences with a ValueError
        raise bs.BitstreamError(f"corrupt payload ({e})") from None
    t_code = 0.0
    tc = time.perf_counter()
    zshape = (1, N, Hp // 64, Wp // 64)
    try:
        z = reader.read(_z_index(torch.empty(zshape, device="meta")), ctx.z_tables)
    except (StreamError, ValueError) as e:
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
        except (StreamError, ValueError) as e:
            raise bs.BitstreamError(str(e)) from None
        t_code += time.perf_counter() - tcc
        return torch.from_numpy(v.astype(np.float64)).to(dev)

    y_hat = _dual_prior(eng, params, None, dec)
    if not reader.is_empty():
        raise bs.BitstreamError("corrupt payload (entropy decoder did not end in its initial state)")
    _sync(dev)
    t1 = time.perf_counter()
    curr_q = curr_q64(model, hdr.q_scale)
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
                engine: Engine | None = None) -> dict[str, torch.Tensor]:
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
