"""Streams written by an earlier version of the codec still decode bit-exactly, and encoding the same images today
writes the same bytes.

``data/pinned_*.evc`` were encoded from ``data/pinned_*.png`` by a randomly initialised EVC_SS (``torch.manual_seed(0)``
then ``build_model("EVC_SS")``); ``data/pinned.json`` records each stream's rate, its SHA-256 and the SHA-256 of the
decoded 8-bit image and of the decoded latents. These files are never regenerated: a change that breaks them breaks
every stream written before it.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from maskdecay_examples import evc
from maskdecay_examples.evc.cli.imageio import to_uint8
from maskdecay_examples.evc.engines.fast import FastEngine

DATA = os.path.join(os.path.dirname(__file__), "data")
with open(os.path.join(DATA, "pinned.json")) as _f:
    MANIFEST = json.load(_f)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(MANIFEST["seed"])
    m = evc.build_model(MANIFEST["arch"]).eval()
    assert evc.weights_hash(m).hex() == MANIFEST["weights_hash"]
    return m


@pytest.mark.parametrize("case", MANIFEST["streams"], ids=lambda c: c["stream"])
def test_pinned_stream_decodes(model, case):
    with open(os.path.join(DATA, case["stream"]), "rb") as f:
        data = f.read()
    assert _sha(data) == case["stream_sha256"]
    for engine in (None, FastEngine(model)):
        out = evc.decompress(model, data, engine=engine)
        img = to_uint8(out.x_hat)
        assert list(img.shape) == case["decoded_shape"]
        assert _sha(img.tobytes()) == case["decoded_sha256"]
        assert _sha(out.y_hat.cpu().numpy().tobytes()) == case["latent_sha256"]


@pytest.mark.parametrize("case", MANIFEST["streams"], ids=lambda c: c["image"])
def test_pinned_image_encodes_to_same_bytes(model, case):
    x, flags, _ = evc.load_image(os.path.join(DATA, case["image"]))
    res = evc.compress(model, x, evc.select_rate(model, **case["rate"]), flags=flags)
    assert _sha(res.data) == case["stream_sha256"]
    fast = evc.compress(model, x, evc.select_rate(model, **case["rate"]), flags=flags, engine=FastEngine(model))
    assert fast.data == res.data
