"""The ``.evc`` container: header, payload, CRC32.

Layout (big-endian, see docs/evc_bitstream.md)::

    offset size field
    0      4    magic  b"\\x89EVC"
    4      1    format version (1)
    5      1    flags  (bit0: source was greyscale, bit1: source had alpha; informational)
    6      1    architecture code (models.ARCH_CODES; 255 = custom widths)
    7      8    decoder-weights hash (first 8 bytes of SHA-256 over the decoder-side tensors)
    15     4    entropy-tables CRC32 (z tables of this model + the fixed Gaussian tables)
    19     4    image height (original, unpadded)
    23     4    image width
    27     4    q_scale (IEEE float32)
    31     1    rate index (0..anchor_num-1 for an anchor, 255 = interpolated / explicit q_scale)
    32     4    payload length L in bytes (multiple of 4)
    36     L    payload: constriction ANS words, little-endian uint32
    36+L   4    CRC32 of bytes [0, 36+L)
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "MAX_SIDE",
    "MAX_PIXELS",
    "FLAG_GREY",
    "FLAG_ALPHA",
    "Q_SCALE_MIN",
    "Q_SCALE_MAX",
    "q_scale_error",
    "Header",
    "BitstreamError",
    "pack",
    "unpack",
]

MAGIC = b"\x89EVC"
VERSION = 1
_FMT = ">4sBBB8sIIIfBI"
HEADER_SIZE = struct.calcsize(_FMT)  # 36
TRAILER_SIZE = 4
MAX_SIDE = 1 << 16
MAX_PIXELS = 1 << 28
FLAG_GREY = 1
FLAG_ALPHA = 2
#: the q_scale range that encoder and decoder both accept (inclusive; powers of two, exact in float32)
Q_SCALE_MIN = 2.0 ** -20
Q_SCALE_MAX = 2.0 ** 20


def q_scale_error(q_scale: float) -> str | None:
    """Why ``q_scale`` (as stored: float32) cannot be coded, or None when it is in the shared range. The encoder
    (:func:`~maskdecay_examples.evc.coding.rate.select_rate`, ``--q-scale``) and the decoder (:func:`unpack`) use
    this one check, so every stream the encoder writes is one the decoder reads."""
    if not (Q_SCALE_MIN <= q_scale <= Q_SCALE_MAX):  # False for NaN too
        return f"q_scale {q_scale:g} outside the supported range [2^-20, 2^20]"
    return None


class BitstreamError(ValueError):
    """The input is not a valid .evc stream (or not one this model can decode)."""


@dataclass(frozen=True)
class Header:
    """Decoded header fields."""

    flags: int
    arch_code: int
    weights_hash: bytes
    tables_crc: int
    height: int
    width: int
    q_scale: float
    rate_index: int
    version: int = VERSION


def pack(h: Header, payload: bytes) -> bytes:
    """Serialise header + payload + CRC32."""
    err = q_scale_error(float(struct.unpack(">f", struct.pack(">f", h.q_scale))[0]))
    if err is not None:
        raise BitstreamError(err)
    if not (1 <= h.height <= MAX_SIDE and 1 <= h.width <= MAX_SIDE and h.height * h.width <= MAX_PIXELS):
        raise BitstreamError(f"image size {h.width}x{h.height} outside the supported range")
    if len(payload) % 4:
        raise BitstreamError("payload length must be a multiple of 4")
    head = struct.pack(_FMT, MAGIC, VERSION, h.flags & 0xFF, h.arch_code & 0xFF, h.weights_hash[:8].ljust(8, b"\0"),
                       h.tables_crc & 0xFFFFFFFF, h.height, h.width, h.q_scale, h.rate_index & 0xFF, len(payload))
    body = head + payload
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def unpack(data: bytes) -> tuple[Header, bytes]:
    """Parse and validate a stream; raises :class:`BitstreamError` with a one-line reason."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise BitstreamError("not an EVC stream (bad magic)")
    if len(data) < HEADER_SIZE + TRAILER_SIZE:
        raise BitstreamError(f"truncated stream ({len(data)} bytes, header needs {HEADER_SIZE + TRAILER_SIZE})")
    (magic, version, flags, arch, whash, tcrc, height, width, q_scale, rate_index,
     plen) = struct.unpack(_FMT, data[:HEADER_SIZE])
    if version != VERSION:
        raise BitstreamError(f"unsupported format version {version} (this decoder reads version {VERSION})")
    expected = HEADER_SIZE + plen + TRAILER_SIZE
    if len(data) < expected:
        raise BitstreamError(f"truncated stream ({len(data)} bytes, header says {expected})")
    if len(data) > expected:
        raise BitstreamError(f"trailing garbage ({len(data) - expected} extra bytes)")
    (crc,) = struct.unpack(">I", data[HEADER_SIZE + plen:])
    if crc != zlib.crc32(data[:HEADER_SIZE + plen]) & 0xFFFFFFFF:
        raise BitstreamError("CRC mismatch: the stream is corrupt")
    if plen % 4:
        raise BitstreamError("corrupt stream (payload length not a multiple of 4)")
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE and height * width <= MAX_PIXELS):
        raise BitstreamError(f"corrupt stream (image size {width}x{height})")
    if q_scale_error(q_scale) is not None:
        raise BitstreamError(f"corrupt stream ({q_scale_error(q_scale)})")
    h = Header(flags, arch, bytes(whash), tcrc, height, width, float(q_scale), rate_index, version)
    return h, bytes(data[HEADER_SIZE:HEADER_SIZE + plen])
