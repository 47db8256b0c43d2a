"""Entropy models and entropy coding on ``constriction`` (ANS, 32-bit words).

* y: zero-mean Gaussian on mean-removed rounded residuals; sigma is mapped to one of 256 log-spaced table entries
  from 0.11 to 64 (index = the largest entry <= sigma, as in the official code). Each table covers [-c, c] with
  c = the smallest integer in [2, 50] with Phi(c/sigma) > 0.9999, plus one escape bin for everything else.
* z: per-channel factorized model (the BitEstimator CDF), one table per channel over [-minima, maxima] + escape.
* Every table is quantised to 16-bit integer frequencies (each bin >= 1) here, so constriction receives exact dyadic
  probabilities; the tables are a deterministic function of the (hashed) weights.
* Escapes: the escape bin, then the overflow (zig-zag) as its bit length with a uniform model over 0..31 and the
  remaining bits with uniform models (<= 16 bits per call).

The coder is a stack, so :class:`SymbolWriter` records operations in decode order and pushes them in reverse.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch

import constriction

_model = constriction.stream.model
_stack = constriction.stream.stack

__all__ = [
    "PRECISION",
    "SCALE_MIN",
    "SCALE_MAX",
    "SCALE_LEVELS",
    "Table",
    "scale_table",
    "scale_to_index",
    "gaussian_tables",
    "factorized_tables",
    "tables_crc",
    "SymbolWriter",
    "SymbolReader",
    "StreamError",
]

PRECISION = 16
SCALE_MIN = 0.11
SCALE_MAX = 64.0
SCALE_LEVELS = 256
#: ratio between consecutive scale-table entries, fixed as a literal so the table is built by exact IEEE products
_SCALE_RATIO = float.fromhex("0x1.0678b8c95f404p+0")  # (64/0.11)**(1/255)
MAX_ABS_SYMBOL = 1 << 29


class StreamError(ValueError):
    """A corrupt or inconsistent payload."""


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------
def quantize_pmf(p: Sequence[float], precision: int = PRECISION) -> np.ndarray:
    """Integer frequencies summing to 2**precision, every bin >= 1 (deterministic integer arithmetic after the
    float multiply)."""
    p = np.asarray(p, dtype=np.float64)
    p = np.maximum(p, 0.0)
    n = p.size
    total = 1 << precision
    s = float(p.sum())
    if not s > 0:
        p = np.ones(n)
        s = float(n)
    freq = 1 + np.floor(p / s * (total - n)).astype(np.int64)
    freq[int(np.argmax(freq))] += total - int(freq.sum())
    return freq


@dataclass
class Table:
    """A quantised table over integer symbols [lo, hi] plus an escape bin (last)."""

    freqs: np.ndarray
    lo: int
    _model: object | None = field(default=None, repr=False)
    _bits: np.ndarray | None = field(default=None, repr=False)

    @property
    def hi(self) -> int:
        return self.lo + len(self.freqs) - 2

    @property
    def escape(self) -> int:
        return len(self.freqs) - 1

    @property
    def model(self) -> object:
        if self._model is None:
            self._model = _model.Categorical(self.freqs.astype(np.float64) / (1 << PRECISION), perfect=False)
        return self._model

    @property
    def bits(self) -> np.ndarray:
        """Ideal code length (bits) of each bin."""
        if self._bits is None:
            self._bits = PRECISION - np.log2(self.freqs.astype(np.float64))
        return self._bits


@lru_cache(maxsize=1)
def scale_table() -> np.ndarray:
    """The 256 log-spaced Gaussian scales from 0.11 to ~64 (built by repeated exact multiplication)."""
    t = np.empty(SCALE_LEVELS, dtype=np.float64)
    v = SCALE_MIN
    for i in range(SCALE_LEVELS):
        t[i] = v
        v = v * _SCALE_RATIO
    return t


def scale_to_index(scales: torch.Tensor) -> torch.Tensor:
    """Table index of each predicted sigma: the largest entry <= sigma, clamped to [0, 255]. Pure comparisons."""
    table = torch.from_numpy(scale_table()).to(scales.device)
    idx = torch.searchsorted(table, scales.to(torch.float64).contiguous(), right=True) - 1
    return idx.clamp_(0, SCALE_LEVELS - 1)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@lru_cache(maxsize=1)
def gaussian_tables() -> tuple[Table, ...]:
    """One quantised table per scale-table entry."""
    out = []
    for s in scale_table():
        c = 50
        for i in range(2, 51):
            if _phi(i / s) > 0.9999:
                c = i
                break
        pmf = [_phi((k + 0.5) / s) - _phi((k - 0.5) / s) for k in range(-c, c + 1)]
        pmf.append(2.0 * _phi((-c - 0.5) / s))
        out.append(Table(quantize_pmf(pmf), -c))
    return tuple(out)


def factorized_tables(bit_estimator: torch.nn.Module) -> tuple[Table, ...]:
    """Per-channel tables of the z model, computed in float64 numpy from the BitEstimator parameters."""
    layers = [bit_estimator.f1, bit_estimator.f2, bit_estimator.f3, bit_estimator.f4]
    params = []
    for lay in layers:
        h = lay.h.detach().double().cpu().numpy().reshape(-1, 1)
        b = lay.b.detach().double().cpu().numpy().reshape(-1, 1)
        a = None if lay.a is None else lay.a.detach().double().cpu().numpy().reshape(-1, 1)
        params.append((h, b, a))
    C = params[0][0].shape[0]

    def cdf(x: np.ndarray) -> np.ndarray:
        x = np.broadcast_to(x, (C, x.shape[-1])).astype(np.float64)
        for h, b, a in params:
            x = x * np.logaddexp(0.0, h) + b
            if a is not None:
                x = x + np.tanh(x) * np.tanh(a)
        return 1.0 / (1.0 + np.exp(-x))

    ints = np.arange(2, 51, dtype=np.float64)[None, :]
    lo_cdf = cdf(-ints)  # CDF(-i)
    hi_cdf = cdf(ints)
    tables = []
    for ch in range(C):
        mi = np.nonzero(lo_cdf[ch] < 1e-4)[0]
        minima = int(ints[0, mi[0]]) if mi.size else 50
        ma = np.nonzero(hi_cdf[ch] > 0.9999)[0]
        maxima = int(ints[0, ma[0]]) if ma.size else 50
        ks = np.arange(-minima, maxima + 1, dtype=np.float64)
        edges = cdf(np.concatenate([ks - 0.5, [maxima + 0.5]])[None, :])[ch]
        pmf = np.diff(edges)
        tail = edges[0] + (1.0 - edges[-1])
        tables.append(Table(quantize_pmf(np.append(pmf, tail)), -minima))
    return tuple(tables)


def tables_crc(tables: Sequence[Table]) -> int:
    """CRC32 over the (lo, frequencies) of a list of tables."""
    crc = 0
    for t in tables:
        crc = zlib.crc32(np.int64(t.lo).tobytes(), crc)
        crc = zlib.crc32(t.freqs.astype("<i8").tobytes(), crc)
    return crc


# ---------------------------------------------------------------------------------------------------------------
# coding
# ---------------------------------------------------------------------------------------------------------------
_UNI_NBITS = 32


@lru_cache(maxsize=64)
def _uniform(size: int) -> object:
    return _model.Uniform(size)


class _TableSet:
    """Per-table arrays of one table sequence, built once: lower bounds, escape bins, the constriction models and the
    ideal code lengths padded into one (tables, bins) matrix."""

    def __init__(self, tables: Sequence[Table]) -> None:
        self.tables = tables  # held, so the id() key of the cache stays this object's
        self.los = np.array([t.lo for t in tables], dtype=np.int64)
        self.escs = np.array([t.escape for t in tables], dtype=np.int64)
        self.models = [t.model for t in tables]
        width = max((len(t.freqs) for t in tables), default=1)
        bits = np.zeros((len(tables), width), dtype=np.float64)
        for i, t in enumerate(tables):
            bits[i, :len(t.freqs)] = t.bits
        self.bits = bits.ravel()  # table t, bin k at row_starts[t] + k
        self.row_starts = np.arange(len(tables), dtype=np.int64) * width


_TABLE_SETS: dict[int, _TableSet] = {}


def _table_set(tables: Sequence[Table]) -> _TableSet:
    ts = _TABLE_SETS.get(id(tables))
    if ts is None or ts.tables is not tables:
        if len(_TABLE_SETS) >= 16:
            _TABLE_SETS.pop(next(iter(_TABLE_SETS)))
        ts = _TABLE_SETS[id(tables)] = _TableSet(tables)
    return ts


def _table_indices(idx: np.ndarray | Sequence[int], n_tables: int) -> np.ndarray:
    """``idx`` flattened to the narrowest unsigned type that holds ``n_tables`` (gathers and the radix argsort run
    on it), after checking its range."""
    idx = np.asarray(idx).ravel()
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_tables):
        raise ValueError(f"table indices must be in [0, {n_tables}), got [{int(idx.min())}, {int(idx.max())}]")
    return idx.astype(np.uint8 if n_tables <= 256 else np.uint16 if n_tables <= 65536 else np.int64, copy=False)


class _Grouped:
    """The symbols of one call grouped by table, the order in which they are coded: table by table, stream order
    within a table. ``order`` maps that layout to stream positions; ``counts``, ``lo`` and ``esc_of`` (each
    symbol's table bound and escape bin, in the grouped layout) come with it."""

    def __init__(self, tables: Sequence[Table], idx: np.ndarray | Sequence[int]) -> None:
        self.tables = _table_set(tables)
        idx = _table_indices(idx, len(tables))
        self.size = idx.size
        self.counts = np.bincount(idx, minlength=len(tables))
        # stable argsort; on 8/16-bit keys numpy sorts by radix, several times faster than on int64
        self.order = np.argsort(idx, kind="stable")
        self.lo = np.repeat(self.tables.los, self.counts)
        self.esc_of = np.repeat(self.tables.escs, self.counts)

    def segments(self) -> Iterator[tuple[object, int, int]]:
        """(model, start, stop) of every table that has symbols, in coding order."""
        start = 0
        for t, n in enumerate(self.counts.tolist()):
            if n:
                yield self.tables.models[t], start, start + n
                start += n

    def in_stream_order(self, k: np.ndarray) -> np.ndarray:
        """Grouped positions ``k`` sorted by their stream position (escapes are coded in stream order)."""
        return k[np.argsort(self.order[k])]


class SymbolWriter:
    """Collects symbol groups in decode order; :meth:`finish` pushes them onto an ANS stack in reverse."""

    def __init__(self) -> None:
        self._ops: list[tuple[np.ndarray, object]] = []
        self.ideal_bits = 0.0
        self.num_symbols = 0

    def _push(self, syms: np.ndarray, model: object) -> None:
        if syms.size:
            self._ops.append((np.ascontiguousarray(syms, dtype=np.int32), model))

    def write(self, values: np.ndarray, idx: np.ndarray, tables: Sequence[Table]) -> None:
        """Code integer ``values`` (any shape) with the per-symbol table indices ``idx`` (same shape)."""
        values = np.asarray(values).ravel()
        # checked before any integer cast: a non-finite or huge float would wrap to an arbitrary int64
        if values.size and not bool(np.all((values > -MAX_ABS_SYMBOL) & (values < MAX_ABS_SYMBOL))):
            raise StreamError("latent symbol not finite or out of the codable range (|s| >= 2^29): the q_scale is "
                              "too small for this image, or the input or weights are broken")
        values = values.astype(np.int64)
        g = _Grouped(tables, idx)
        if g.size != values.size:
            raise ValueError(f"{values.size} values but {g.size} table indices")
        cat = values[g.order] - g.lo  # bin within the table; negative or >= the escape bin: escaped
        esc = g.in_stream_order(np.flatnonzero(cat.view(np.uint64) >= g.esc_of.view(np.uint64)))  # negatives wrap
        v_esc, esc_bins = cat[esc], g.esc_of[esc]
        cat[esc] = esc_bins
        self.ideal_bits += float(g.tables.bits[np.repeat(g.tables.row_starts, g.counts) + cat].sum())
        cat = cat.astype(np.int32)
        self._ops += [(cat[start:stop], model) for model, start, stop in g.segments()]
        self.num_symbols += values.size
        self._write_escapes(v_esc, esc_bins)

    def _write_escapes(self, v: np.ndarray, esc: np.ndarray) -> None:
        if not v.size:
            return
        raw = np.where(v < 0, -2 * v - 1, 2 * (v - esc)).astype(np.int64)
        nbits = np.zeros(raw.shape, dtype=np.int64)
        r = raw.copy()
        while np.any(r):
            nz = r > 0
            nbits[nz] += 1
            r >>= 1
        self._push(nbits, _uniform(_UNI_NBITS))
        self.ideal_bits += 5.0 * raw.size
        for k in range(2, _UNI_NBITS):
            sel = nbits == k
            if not np.any(sel):
                continue
            rem = raw[sel] - (1 << (k - 1))
            low = min(16, k - 1)
            self._push(rem & ((1 << low) - 1), _uniform(1 << low))
            if k - 1 > 16:
                self._push(rem >> 16, _uniform(1 << (k - 17)))
            self.ideal_bits += float(k - 1) * int(sel.sum())

    def finish(self) -> bytes:
        """Entropy-code everything recorded; returns the payload (little-endian uint32 words)."""
        coder = _stack.AnsCoder()
        for syms, model in reversed(self._ops):
            coder.encode_reverse(syms, model)
        return coder.get_compressed().astype("<u4").tobytes()


class SymbolReader:
    """Decodes what :class:`SymbolWriter` wrote, call for call."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) % 4:
            raise StreamError("payload length is not a multiple of 4")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        self._coder = _stack.AnsCoder(words)

    def is_empty(self) -> bool:
        """True when all data was consumed and the coder is back in its initial state (a valid stream's end)."""
        return bool(self._coder.is_empty())

    def _pop(self, n: int, model: object) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return self._decode(n, model).astype(np.int64)

    def _decode(self, n: int, model: object) -> np.ndarray:
        try:
            return self._coder.decode(model, int(n))
        except Exception as e:  # noqa: BLE001
            raise StreamError(f"entropy decoding failed ({e})") from None

    def read(self, idx: np.ndarray, tables: Sequence[Table]) -> np.ndarray:
        """Decode values for the given table indices; returns an int64 array shaped like ``idx``."""
        shape = np.shape(idx)
        g = _Grouped(tables, idx)
        cat = np.empty(g.size, dtype=np.int32)
        for model, start, stop in g.segments():
            cat[start:stop] = self._decode(stop - start, model)
        # a categorical model only decodes bins of its own table (0..escape), so no range check is needed here
        vals = cat + g.lo
        esc = np.flatnonzero(cat == g.esc_of)
        if esc.size:
            esc = g.in_stream_order(esc)
            vals[esc] += self._read_escapes(g.esc_of[esc]) - g.esc_of[esc]
        v = np.empty(g.size, dtype=np.int64)
        v[g.order] = vals
        return v.reshape(shape)

    def _read_escapes(self, esc: np.ndarray) -> np.ndarray:
        nbits = self._pop(esc.size, _uniform(_UNI_NBITS))
        raw = np.zeros(esc.size, dtype=np.int64)
        raw[nbits == 1] = 1
        for k in range(2, _UNI_NBITS):
            sel = nbits == k
            n = int(sel.sum())
            if not n:
                continue
            low = min(16, k - 1)
            rem = self._pop(n, _uniform(1 << low))
            if k - 1 > 16:
                rem = rem | (self._pop(n, _uniform(1 << (k - 17))) << 16)
            raw[sel] = rem + (1 << (k - 1))
        return np.where(raw % 2 == 1, -(raw + 1) // 2, raw // 2 + esc)
