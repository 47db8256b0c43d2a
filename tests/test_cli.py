"""The ``maskdecay`` console script: ``profile`` and ``plot``."""
from __future__ import annotations

import json

import pytest
import torch

import maskdecay as md
from maskdecay.cli import main
from tests.nets import resnet_cifar


def test_profile_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["profile", "tests.nets:mobilenetv2_tiny", "--input", "1,3,32,32", "--runs", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert text.startswith("MACs ")
    assert report["macs"] > 0 and report["params"] > 0


@pytest.mark.parametrize("argv, message", [
    (["profile", "tests.nets", "--input", "1,3,32,32"], "MODULE:FACTORY"),
    (["profile", "no_such_module_xyz:f", "--input", "1,3,32,32"], "cannot import"),
    (["profile", "tests.nets:no_such_factory", "--input", "1,3,32,32"], "no attribute"),
    (["plot", "does/not/exist"], "no decay history"),
])
def test_bad_arguments_give_one_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_input_shape_is_rejected():
    with pytest.raises(SystemExit):
        main(["profile", "tests.nets:mobilenetv2_tiny", "--input", "1,3,x"])


def test_plot_redraws_from_run_dirs(tmp_path, capsys):
    for reg in ("sparsity", "l2"):
        torch.manual_seed(0)
        model = resnet_cifar(20)
        masks = md.ChannelMasks(model, torch.randn(1, 3, 32, 32))
        decay = md.MaskDecay(masks, md.plan(masks, macs=0.5), steps=4, regularizer=reg)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(5):
            loss = model(torch.randn(2, 3, 32, 32)).square().mean() + decay.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
        run = tmp_path / reg
        run.mkdir()
        (run / "history.json").write_text(json.dumps(decay.history))
    out = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "sparsity"), str(tmp_path / "l2"), "-o", str(out), "--trajectories"]) == 0
    assert out.stat().st_size > 0
    assert (tmp_path / "sparsity" / "masks.png").stat().st_size > 0
    assert (tmp_path / "l2" / "masks.png").stat().st_size > 0
