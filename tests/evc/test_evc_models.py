"""EVC models: state-dict layout (from the reference facts), parameter counts, save/load round trip, loader errors."""
from __future__ import annotations

import io
import os

import pytest
import torch

from maskdecay_examples import evc
from maskdecay_examples.evc.models.architectures import ARCHS, WIDTHS
from maskdecay_examples.evc.models.zoo import extract_state_dict, infer_config


def _conv(d, k, cout, cin, kh=1, kw=1):
    d[k + ".weight"] = (cout, cin, kh, kw)
    d[k + ".bias"] = (cout,)


def _t_dcb(d, p, c):
    """transform-flavour DepthConvBlock(c, c)"""
    _conv(d, p + ".block.0.conv1.0", c, c)
    _conv(d, p + ".block.0.depth_conv.0", c, 1, 3, 3)
    _conv(d, p + ".block.0.conv2.0", c, c)
    _conv(d, p + ".block.1.conv.0", 4 * c, c)
    _conv(d, p + ".block.1.conv.2", c, 4 * c)


def _p_dc(d, p, cin, cout):
    _conv(d, p + ".conv1.0", cin, cin)
    _conv(d, p + ".depth_conv", cin, 1, 3, 3)
    _conv(d, p + ".conv2", cout, cin)
    if cin != cout:
        _conv(d, p + ".adaptor", cout, cin)


def _p_ffn(d, p, c):
    h = max(min(4 * c, 1024), 2 * c)
    _conv(d, p + ".conv.0", h, c)
    _conv(d, p + ".conv.2", c, h)


def _p_dcb(d, p, cin, cout):
    _p_dc(d, p + ".block.0", cin, cout)
    _p_ffn(d, p + ".block.1", cout)


def _enc(d, p, w):
    c1, c2, c3, c4 = w
    for i, (a, b) in zip((0, 2, 4), ((3, c1), (c1, c2), (c2, c3))):
        _conv(d, f"{p}.{i}.conv1", b, a, 3, 3)
        _conv(d, f"{p}.{i}.conv2", b, b, 3, 3)
        _conv(d, f"{p}.{i}.downsample", b, a)
    for i, c in zip((1, 3, 5), (c1, c2, c3)):
        _t_dcb(d, f"{p}.{i}", c)
    _conv(d, f"{p}.6", c4, c3, 3, 3)


def _dec(d, w):
    c1, c2, c3, c4 = w
    for i, c in zip((0, 2, 4, 6), (c4, c3, c2, c1)):
        _t_dcb(d, f"dec.{i}", c)
    for i, (a, b) in zip((1, 3, 5), ((c4, c3), (c3, c2), (c2, c1))):
        _conv(d, f"dec.{i}.subpel_conv.0", 4 * b, a)
        _conv(d, f"dec.{i}.conv", b, b, 3, 3)
        _conv(d, f"dec.{i}.upsample.0", 4 * b, a)
    _conv(d, "dec.7.0", 12, c1)


def expected_layout(enc_size: str, dec_size: str, scalable: bool, N: int = 192) -> dict[str, tuple]:
    """Key -> shape, written from section 1.9 of the reference (not from our modules)."""
    d: dict[str, tuple] = {}
    if scalable:
        for i in range(4):
            _enc(d, f"encs.{i}", WIDTHS[enc_size])
    else:
        _enc(d, "enc", WIDTHS[enc_size])
    _dec(d, WIDTHS[dec_size])
    _p_dcb(d, "hyper_enc.0", N, N)
    _conv(d, "hyper_enc.1", N, N, 3, 3)
    _conv(d, "hyper_enc.3", N, N, 3, 3)
    for i in (0, 1):
        _p_dc(d, f"hyper_dec.{i}.block.0", N, N)
        _p_ffn(d, f"hyper_dec.{i}.block.1", N)
        _conv(d, f"hyper_dec.{i}.block.2", 4 * N, N)
    _p_dcb(d, "hyper_dec.2", N, N)
    _p_dcb(d, "y_prior_fusion.0", N, 2 * N)
    _p_dcb(d, "y_prior_fusion.1", 2 * N, 3 * N)
    _p_dcb(d, "y_spatial_prior.0", 4 * N, 3 * N)
    _p_dcb(d, "y_spatial_prior.1", 3 * N, 2 * N)
    _p_dcb(d, "y_spatial_prior.2", 2 * N, 2 * N)
    for f in ("f1", "f2", "f3", "f4"):
        for p in ("h", "b", "a"):
            if f == "f4" and p == "a":
                continue
            d[f"bit_estimator_z.{f}.{p}"] = (1, N, 1, 1)
    d["q_basic"] = (1, N, 1, 1)
    d["q_scale"] = (4, 1, 1, 1)
    return d


@pytest.mark.parametrize("arch", ["EVC_LL", "EVC_SS", "Scale_EVC_SS"])
def test_state_dict_layout_matches_reference(arch):
    e, dsz, sc = ARCHS[arch]
    exp = expected_layout(e, dsz, sc)
    got = {k: tuple(v.shape) for k, v in evc.build_model(arch).state_dict().items()}
    assert set(got) == set(exp), (sorted(set(got) - set(exp))[:5], sorted(set(exp) - set(got))[:5])
    bad = {k: (got[k], exp[k]) for k in exp if got[k] != exp[k]}
    assert not bad


# derived totals from the reference (section 4.2), parameters in units
PARAMS = {"EVC_LL": 17_381_776, "EVC_SS": 12_778_256, "EVC_LM": 16_337_296, "EVC_LS": 15_147_792,
          "EVC_ML": 16_271_376, "EVC_SL": 15_012_240, "EVC_MM": 15_226_896,
          "Scale_EVC_SS": 15_232_976, "Scale_EVC_SL": 17_466_960}


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "EVC_MS"])
def test_save_reload_identical_outputs(arch, tmp_path):
    torch.manual_seed(1)
    m = evc.build_model(arch).eval()
    assert sum(p.numel() for p in m.parameters()) == PARAMS[arch]  # reference 4.2 totals
    path = tmp_path / f"{arch}.pth.tar"
    evc.save_model(m, path)
    m2 = evc.load_model(path)  # arch inferred from shapes, strict
    assert m2.name == arch
    assert type(m2) is type(m)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = m(x, 0.9)
        b = m2(x, 0.9)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if arch in ("EVC_SS", "Scale_EVC_SS"):
        r = evc.select_rate(m, rate_index=1)
        assert torch.equal(evc.reconstruct(m, x, r)["x_hat"], evc.reconstruct(m2, x, r)["x_hat"])


def test_wrappers_prefixes_and_teacher_student(tmp_path):
    torch.manual_seed(2)
    m = evc.build_model("EVC_SS")
    sd = m.state_dict()
    for wrapped in ({"state_dict": sd}, {"net": {"module." + k: v for k, v in sd.items()}},
                    {"state_dict": {"student." + k: v for k, v in sd.items()}}):
        m2 = evc.load_model(wrapped)
        assert m2.name == "EVC_SS"
        assert all(torch.equal(v, m2.state_dict()[k]) for k, v in sd.items())
    t = evc.build_model("EVC_LL").state_dict()
    both = {**{"student." + k: v for k, v in sd.items()}, **{"teacher." + k: v for k, v in t.items()}}
    assert evc.load_model(both).name == "EVC_SS"
    assert evc.load_model(both, prefer="teacher").name == "EVC_LL"
    assert evc.load_model(both, arch="EVC_SS").name == "EVC_SS"


def test_scale_model_loads_single_encoder_checkpoint():
    sd = evc.build_model("EVC_SS").state_dict()
    m = evc.build_model("Scale_EVC_SS")
    m.load_state_dict(sd, strict=True)  # enc.* fills every encs.i.*
    for i in range(4):
        assert torch.equal(m.encs[i][6].weight, sd["enc.6.weight"])


def test_mini_family_roundtrip(tmp_path):
    m = evc.build_model("mini_EVC_LL")
    assert m.N == 48 and m.enc_widths == (48, 48, 48, 48)
    evc.save_model(m, tmp_path / "mini.pt")
    m2 = evc.load_model(tmp_path / "mini.pt")
    assert m2.config == m.config
    assert infer_config(m.state_dict())["enc_widths"] == (48, 48, 48, 48)


def test_loader_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not an EVC checkpoint"):
        evc.load_model(junk)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, other)
    with pytest.raises(ValueError, match="not an EVC checkpoint"):
        evc.load_model(other)
    with pytest.raises(ValueError, match="no such checkpoint"):
        evc.load_model(tmp_path / "missing.pth")
    sd = evc.build_model("EVC_SS").state_dict()
    with pytest.raises(ValueError, match="does not match architecture EVC_LL"):
        evc.load_model(sd, arch="EVC_LL")
    sd.pop("dec.7.0.bias")
    with pytest.raises(ValueError, match="missing"):
        evc.load_model(sd)
    # pickled arbitrary objects are refused by weights_only loading
    evil = tmp_path / "evil.pth"
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "obj": object()}, buf)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not an EVC checkpoint"):
        evc.load_model(evil)
    with pytest.raises(ValueError):
        extract_state_dict([1, 2, 3])


def test_ste_forward_trains(tmp_path):
    from maskdecay_examples.evc.training.brief import train

    kodak = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "kodak")
    m = evc.build_model("mini_EVC_SS")
    x = torch.rand(2, 3, 64, 64)
    out = m(x, m.q_scale[0].view(1, 1, 1, 1), quant="ste")
    (out["bits_y"].sum() + out["x_hat"].square().mean()).backward()
    assert m.enc[0].conv1.weight.grad is not None and m.q_scale.grad is not None
    with pytest.raises(ValueError):
        m(x, 1.0, quant="noise")
    if os.path.isdir(kodak):
        t = train(kodak, "mini_EVC_SS", steps=2, batch=2, size=64, progress=False)
        assert not t.training


def test_entropy_coder_buffers_are_ignored():
    sd = evc.build_model("EVC_SS").state_dict()
    sd["gaussian_encoder.scale_table"] = torch.zeros(256)
    sd["bit_estimator_z._quantized_cdf"] = torch.zeros(192, 103, dtype=torch.int32)
    assert evc.load_model({"net": sd}).name == "EVC_SS"
