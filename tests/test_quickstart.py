"""The quick-start demo end to end at a tiny scale, on data in the official CIFAR-10 python release format."""
from __future__ import annotations

import json
from pathlib import Path

from maskdecay_examples import cifar
from maskdecay_examples.quickstart.demo import main

from tests.test_cifar import _release


def test_quickstart_demo_runs_on_the_official_release(tmp_path: Path, capsys) -> None:
    _release(tmp_path / "data", archive=True)
    out = tmp_path / "out"
    assert main(["--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "1", "--steps", "2",
                 "--finetune-steps", "1", "--batch-size", "8", "--decay-batch-size", "4", "--threads", "1",
                 "--regularizers", "sparsity", "hard"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == cifar.ORIGINAL_NOTE
    assert {"teacher", "sparsity", "hard"} <= set(results["rows"])
    assert cifar.ORIGINAL_NOTE in capsys.readouterr().out
