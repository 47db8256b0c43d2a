"""evc rrl: scalable encoder by residual representation learning (tiny scale)."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from maskdecay_examples import evc
from maskdecay_examples.evc.cli.main import main as cli
from maskdecay_examples.evc.training.rrl import ResidualCandidate, scalable_name

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KODAK = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "kodak"))
TINY = os.path.join(ROOT, "examples", "evc", "configs", "tiny.yaml")


def test_scalable_name_and_residual_hook():
    assert scalable_name(evc.build_model("mini_EVC_SS")) == "mini_Scale_EVC_SS"
    assert scalable_name(evc.build_model("EVC_SL")) == "Scale_EVC_SL"
    with pytest.raises(ValueError, match="S encoder"):
        scalable_name(evc.build_model("mini_EVC_MM"))
    with pytest.raises(ValueError, match="decoder must be S or L"):
        scalable_name(evc.EVC((16, 16, 32, 48), (32, 32, 48, 48), N=48))
    a, b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)
    x = torch.rand(1, 3, 5, 5)
    b.register_forward_hook(ResidualCandidate([a]))
    y = b(x)
    assert torch.allclose(y, (a(x) + torch.nn.functional.conv2d(x, b.weight, b.bias)) / 2)
    y.sum().backward()
    assert a.weight.grad is None and b.weight.grad is not None  # earlier encoders get no gradient


@pytest.mark.skipif(not os.path.isdir(KODAK), reason="shared Kodak images not available")
def test_rrl_builds_scale_evc_ss_that_codes(tmp_path):
    torch.manual_seed(0)
    evc.save_model(evc.build_model("mini_EVC_LL"), tmp_path / "t.pt")
    base = evc.build_model("mini_EVC_SS")
    evc.save_model(base, tmp_path / "b.pt")
    rc = cli(["rrl", "--config", TINY, "--teacher", str(tmp_path / "t.pt"), "--base", str(tmp_path / "b.pt"),
              "--out", str(tmp_path / "rrl"), "--steps", "2", "--finetune-steps", "1", "--no-progress",
              "--set", f"data.train={KODAK}", "--set", "val.images=0"])
    assert rc == 0
    m = evc.load_model(tmp_path / "rrl" / "scalable.pt", arch="mini_Scale_EVC_SS")  # strict, official layout
    sd, bsd = m.state_dict(), base.state_dict()
    for k, v in bsd.items():  # encoder 0 and the whole decoder side are the base's, untouched
        if k.startswith("enc."):
            assert torch.equal(sd["encs.0." + k[4:]], v)
        else:
            assert torch.equal(sd[k], v), k
    assert not torch.equal(sd["encs.1.0.conv1.weight"], sd["encs.0.0.conv1.weight"])
    img = tmp_path / "c.png"
    Image.open(os.path.join(KODAK, "kodim03.png")).crop((0, 0, 64, 64)).save(img)
    for extra in (["--enc-id", "1"], []):
        assert cli(["encode", str(img), str(tmp_path / "c.evc"), "--model", str(tmp_path / "rrl" / "scalable.pt"),
                    "--arch", "mini_Scale_EVC_SS", "--rate-index", "2", *extra]) == 0
        assert cli(["decode", str(tmp_path / "c.evc"), str(tmp_path / "d.png"), "--model",
                    str(tmp_path / "rrl" / "scalable.pt"), "--arch", "mini_Scale_EVC_SS"]) == 0
