"""The codec under hostile input: non-finite latents, the shared q_scale range, streams whose declared size the
payload cannot hold, memory bounds, every corrupt stream a BitstreamError, and images of odd sample formats."""
from __future__ import annotations

import dataclasses
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from maskdecay_examples import evc
from maskdecay_examples.evc.cli.fuzz import main as fuzz_main, run_api_fuzz
from maskdecay_examples.evc.cli.main import main as cli
from maskdecay_examples.evc.coding import bitstream as bs
from maskdecay_examples.evc.coding.codec import decode_memory_estimate, min_payload_bits, coding_context
from maskdecay_examples.evc.coding.entropy import StreamError, SymbolWriter, gaussian_tables


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return evc.build_model("mini_EVC_SS").eval()


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.avg_pool2d(torch.rand(1, 3, 40, 72, generator=g), 3, 1, 1)


@pytest.fixture(scope="module")
def stream(mini, image):
    return evc.compress(mini, image, evc.select_rate(mini, rate_index=2)).data


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


# --- 2.1 non-finite or huge latents ---------------------------------------------------------------------------
def test_symbol_writer_refuses_non_finite_and_huge_values_before_casting():
    w = SymbolWriter()
    tables = gaussian_tables()
    for bad in (np.array([1.0, np.nan]), np.array([np.inf, 0.0]), np.array([1e30, 0.0]), np.array([-1e30, 0.0])):
        with pytest.raises(StreamError, match="codable range"):
            w.write(bad, np.zeros(2, dtype=np.int64), tables)


def test_tiny_q_scale_is_a_clear_error_not_a_hang(mini, image):
    t = time.perf_counter()
    with pytest.raises(ValueError, match="q_scale"):
        evc.compress(mini, image, evc.RateSpec(1e-30, 255, 0.01))
    assert time.perf_counter() - t < 30


# --- 2.2 one q_scale range for encoder and decoder ------------------------------------------------------------
@pytest.mark.parametrize("q", [2e6, 1e30, 1e-30, 2.0 ** -21])
def test_encoder_refuses_q_scales_the_decoder_refuses(mini, q):
    assert bs.q_scale_error(q) is not None
    with pytest.raises(ValueError, match="range"):
        evc.select_rate(mini, q_scale=q)


def test_cli_q_scale_out_of_range_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(src)
    assert cli(["encode", str(src), str(tmp_path / "a.evc"), "--model", "random:mini_EVC_SS", "--q-scale",
                "2e6"]) == 2
    assert "range" in capsys.readouterr().err
    assert not (tmp_path / "a.evc").exists()


def test_every_q_scale_the_encoder_accepts_decodes(mini, image):
    for q in (bs.Q_SCALE_MAX, 1e5):
        data = evc.compress(mini, image, evc.select_rate(mini, q_scale=q)).data
        assert evc.decompress(mini, data).x_hat.shape == image.shape
    hdr, payload = bs.unpack(data)
    with pytest.raises(bs.BitstreamError, match="range"):
        bs.pack(dataclasses.replace(hdr, q_scale=2.0 * bs.Q_SCALE_MAX), payload)


# --- 2.3 declared size vs payload, memory ---------------------------------------------------------------------
@pytest.mark.parametrize("side", [(2048, 2048), (8192, 8192)])
def test_empty_payload_with_large_declared_size_is_refused_at_once(mini, stream, side):
    hdr, _ = bs.unpack(stream)
    bad = bs.pack(dataclasses.replace(hdr, height=side[0], width=side[1]), b"")
    t = time.perf_counter()
    with pytest.raises(bs.BitstreamError):
        evc.decompress(mini, bad, max_memory=1 << 50)  # the payload check, not the memory limit
    assert time.perf_counter() - t < 1.0


def test_real_streams_pass_the_payload_bound(mini, image):
    ctx = coding_context(mini)
    for ri in range(4):
        data = evc.compress(mini, image, evc.select_rate(mini, rate_index=ri)).data
        assert (len(data) - 40) * 8 > min_payload_bits(ctx.z_tables, ctx.y_tables, mini, 40, 72)


def test_decoder_memory_is_bounded_and_the_error_names_the_option(mini, stream, tmp_path, capsys):
    hdr, payload = bs.unpack(stream)
    big = bs.pack(dataclasses.replace(hdr, height=8192, width=8192), payload)
    with pytest.raises(bs.BitstreamError, match="max_memory"):
        evc.decompress(mini, big)
    assert decode_memory_estimate(mini, 8192, 8192) > evc.MAX_DECODE_MEMORY
    assert decode_memory_estimate(mini, 40, 72) < evc.MAX_DECODE_MEMORY
    p = tmp_path / "big.evc"
    p.write_bytes(big)
    assert cli(["decode", str(p), str(tmp_path / "o.png"), "--model", "random:mini_EVC_SS"]) == 1
    assert "--max-memory" in capsys.readouterr().err


# --- 2.4 every corrupt stream is a BitstreamError ---------------------------------------------------------------
def test_constriction_errors_are_bitstream_errors(mini, stream):
    hdr, payload = bs.unpack(stream)
    # a payload whose last word is zero: constriction refuses it with its own ValueError
    words = bytearray(payload)
    words[-4:] = bytes(4)
    with pytest.raises(bs.BitstreamError):
        evc.decompress(mini, bs.pack(hdr, bytes(words)))


@pytest.mark.parametrize("wrap", [lambda s: b"\0garbage" + s, lambda s: s + b"garbage", lambda s: s[:-1],
                                  lambda s: b"", lambda s: s[:3]])
def test_garbage_around_a_stream_is_a_bitstream_error(mini, stream, wrap):
    with pytest.raises(bs.BitstreamError):
        evc.decompress(mini, wrap(stream))


def test_api_fuzz_reports_no_crash_hang_or_foreign_exception():
    rep = run_api_fuzz(300, seed=3)
    assert rep.cases == 300 and rep.ok(), (rep.non_bitstream_errors[:3], rep.hangs[:3])
    assert rep.exception_types.keys() == {"BitstreamError"}
    assert 0 < rep.max_case_peak_rss < evc.MAX_DECODE_MEMORY
    assert {"prefix", "huge_header", "payload_words"} <= set(rep.kinds)


def test_fuzz_command_writes_a_json_report(tmp_path):
    out = tmp_path / "fuzz.json"
    assert fuzz_main(["--cases", "40", "--chunk", "20", "--workers", "2", "--seed", "5", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["cases"] == 40 and doc["ok"] and doc["crashes_count"] == 0 and doc["hangs_count"] == 0
    assert doc["non_bitstream_errors_count"] == 0 and doc["max_case_peak_rss"] < doc["memory_limit"]
    assert doc["host"]["cpu"]


# --- 2.5 sample formats ---------------------------------------------------------------------------------------
def test_16bit_png_is_scaled_by_its_format_not_its_maximum(tmp_path):
    arr = np.full((8, 8), 200, np.uint16)
    arr[0, 0] = 100
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    x, flags, note = evc.load_image(p)
    assert abs(float(x[0, 0, 1, 1]) - round(200 / 65535 * 255) / 255) < 1e-6  # dark, not 200/255
    assert flags & bs.FLAG_GREY and "16-bit" in note
    full = np.full((4, 4), 65535, np.uint16)
    Image.fromarray(full).save(p)
    assert float(evc.load_image(p)[0].min()) == 1.0


@pytest.mark.parametrize("mode,dtype", [("I", np.int32), ("F", np.float32)])
def test_32bit_tiff_is_refused(tmp_path, mode, dtype, capsys):
    p = tmp_path / "wide.tif"
    Image.fromarray(np.full((8, 8), 1000, dtype), mode).save(p)
    with pytest.raises(ValueError, match="unsupported image mode"):
        evc.load_image(p)
    assert cli(["encode", str(p), str(tmp_path / "o.evc"), "--model", "random:mini_EVC_SS"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unsupported image mode" in err
