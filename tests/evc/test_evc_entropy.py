"""Entropy tables, scale-index mapping and the escape coder."""
from __future__ import annotations

import math

import numpy as np
import torch

from evc.entropy import (
    SymbolReader,
    SymbolWriter,
    Table,
    gaussian_tables,
    quantize_pmf,
    scale_table,
    scale_to_index,
    tables_crc,
)


def test_gaussian_tables_match_reference_and_are_stable():
    t = scale_table()
    assert t[0] == 0.11 and abs(t[-1] - 64.0) < 1e-9 and len(t) == 256
    tabs = gaussian_tables()
    c = [-x.lo for x in tabs]
    assert c[0] == 2 and c[191] < 50 and c[192] == 50 and c[255] == 50  # reference 3.4
    assert max(len(x.freqs) for x in tabs) == 102  # 2c+1 bins + escape (official cdf_length 103 = bins + 1)
    assert all(int(x.freqs.sum()) == 1 << 16 and x.freqs.min() >= 1 for x in tabs)
    # a different value here means the tables changed: streams would not be decodable across versions/platforms
    assert tables_crc(tabs) == 0x721E865E


def test_scale_index_is_floor_on_log_table():
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(10000, dtype=torch.float64).uniform_(math.log(0.01), math.log(200), generator=g))
    idx = scale_to_index(s)
    step = (math.log(64) - math.log(0.11)) / 255
    ref = torch.clamp(torch.floor((torch.log(s) - math.log(0.11)) / step), 0, 255).long()
    t = torch.from_numpy(scale_table())
    near = ((torch.log(s)[:, None] - torch.log(t)[None]).abs() < 1e-9).any(1)
    assert torch.equal(idx[~near], ref[~near])
    assert scale_to_index(torch.tensor([-1.0, 0.0, 0.10999, 0.11, 1e9])).tolist() == [0, 0, 0, 0, 255]


def test_escape_roundtrip_extreme_values():
    rng = np.random.default_rng(0)
    tabs = (Table(quantize_pmf([0.1, 0.8, 0.1, 1e-4]), -1), Table(quantize_pmf([1.0] * 5 + [1e-3]), -2))
    vals = rng.integers(-3, 4, 5000)
    vals[::97] = rng.integers(-(1 << 28), 1 << 28, vals[::97].size)
    vals[1] = (1 << 29) - 1
    vals[2] = -(1 << 29) + 1
    idx = rng.integers(0, 2, vals.size)
    w = SymbolWriter()
    w.write(vals, idx, tabs)
    w.write(vals[:7], idx[:7], tabs)
    data = w.finish()
    r = SymbolReader(data)
    assert np.array_equal(r.read(idx, tabs), vals)
    assert np.array_equal(r.read(idx[:7], tabs), vals[:7])
    assert r.is_empty()
    assert abs(len(data) * 8 - w.ideal_bits) < 0.01 * w.ideal_bits + 64
