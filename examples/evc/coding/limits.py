"""The decoder's limits against hostile streams: the declared image size, the estimated peak memory of a decode,
and the fewest payload bits a declared size can need. :func:`~.codec.decompress` checks all three before any
network runs."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..models.architectures import EVC
from .entropy import Table

__all__ = ["PAD", "MAX_DECODE_PIXELS", "MAX_DECODE_MEMORY", "decode_memory_estimate", "min_payload_bits"]

#: images are padded to a multiple of this before coding
PAD = 64
#: default limit of :func:`decompress` on the declared image size (8192 x 8192)
MAX_DECODE_PIXELS = 1 << 26
#: default limit of :func:`decompress` on its estimated peak memory (bytes, see :func:`decode_memory_estimate`)
MAX_DECODE_MEMORY = 8 << 30
#: peak-memory model of a decode: bytes per padded pixel per unit of the decoder's width sum c1/4 + c2/16 + c3/64 +
#: c4/256 (the activation sizes per pixel at the four synthesis scales), by (reference engine, exact synthesis);
#: measured with EVC_SS on the CPU (VmHWM at 256x256 and 768x512) and rounded up by 10 %
_MEM_PER_PIXEL = {(True, True): 90.0, (True, False): 62.0, (False, True): 44.0, (False, False): 28.0}
#: what a decode needs besides the image-sized buffers (torch, the model, the tables)
_MEM_BASE = 512 << 20


def decode_memory_estimate(model: EVC, height: int, width: int, exact_synthesis: bool = True,
                           reference: bool = True) -> int:
    """Estimated peak memory (bytes) of decoding a ``height`` x ``width`` image with ``model``: linear in the padded
    pixel count and the decoder's widths; ``reference``: the reference engine (the default of :func:`decompress`),
    else a fast engine."""
    hp = height + (-height) % PAD
    wp = width + (-width) % PAD
    c1, c2, c3, c4 = model.dec_widths
    width_sum = c1 / 4 + c2 / 16 + c3 / 64 + max(c4, model.N) / 256
    return int(_MEM_BASE + hp * wp * _MEM_PER_PIXEL[(bool(reference), bool(exact_synthesis))] * width_sum)


def min_payload_bits(z_tables: Sequence[Table], y_tables: Sequence[Table], model: EVC, height: int,
                     width: int) -> float:
    """The fewest payload bits a stream of a ``height`` x ``width`` image can have: every symbol costs at least
    the code length of the most probable bin of its table (the ANS state's 64 bits are granted as slack)."""
    hp = height + (-height) % PAD
    wp = width + (-width) % PAD
    n_z = (hp // 64) * (wp // 64)
    n_y = model.N * (hp // 16) * (wp // 16)
    z_bits = sum(-np.log2(t.freqs.max() / t.freqs.sum()) for t in z_tables) * n_z
    y_bits = min(-np.log2(t.freqs.max() / t.freqs.sum()) for t in y_tables) * n_y
    return float(z_bits + y_bits) - 64.0
