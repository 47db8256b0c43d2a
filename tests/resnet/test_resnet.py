"""ResNet/CIFAR-10 example: models, config validation, data loading, a tiny end-to-end study (mask decay and both
Torch-Pruning baselines), exact reload of the students, and the speed-up command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import maskdecay as md
from maskdecay_examples.resnet import config, data, methods, models, pipeline, speedup, study, training
from maskdecay_examples.resnet.__main__ import main as cli
from maskdecay_examples.resnet.report import table
from tests.resnet.tiny_cifar import cifar_tar


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    cifar_tar(root / "train.tar", 48, 0)
    cifar_tar(root / "test.tar", 30, 1)
    return root


def test_resnet_sizes() -> None:
    x = torch.randn(1, 3, 32, 32)
    r20, r56 = models.build("resnet20"), models.build("resnet56")
    assert sum(p.numel() for p in r20.parameters()) == pytest.approx(0.27e6, rel=0.03)
    assert md.count_macs(r20, x) == pytest.approx(41e6, rel=0.03)
    assert md.count_macs(r56, x) == pytest.approx(126e6, rel=0.02)
    assert r20(x).shape == (1, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.build("resnet21")


@pytest.mark.parametrize("raw, message", [
    ({"prune": {"decay_step": 3}}, "unknown key 'prune.decay_step' \\(did you mean 'decay_steps'\\?\\)"),
    ({"prune": {"budgets": [0.5, 1.5]}}, "prune.budgets"),
    ({"prune": {"methods": ["l1", "magic"]}}, "unknown method 'magic'"),
    ({"prune": {"decay_steps": "many"}}, "prune.decay_steps: expected an integer"),
    ({"teacher": {"lr": True}}, "teacher.lr: expected a number"),
    ({"model": {"arch": "resnet19"}}, "model.arch"),
    ({"prune": {"strengths": {"hard": 1.0}}}, "prune.strengths"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"data": "here"}, "data: expected a mapping"),
])
def test_config_errors(raw: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(raw)


def test_config_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("prune:\n  budgets: [0.5]\n  decay_steps: 7\n")
    cfg = config.load(f, ["prune.finetune_steps=3", "model.arch=resnet32"])
    assert (cfg.prune.decay_steps, cfg.prune.finetune_steps, cfg.model.arch) == (7, 3, "resnet32")
    f.write_text("prune:\n  decay_stepz: 7\n")
    with pytest.raises(config.ConfigError, match="c.yaml: unknown key"):
        config.load(f)
    assert cli(["prune", "--config", str(f)]) == 2
    configs = Path(__file__).resolve().parents[2] / "examples/resnet/configs"
    config.load(configs / "demo.yaml")
    for name in ("study.yaml", "resnet56_gpu.yaml"):
        study.load_config(configs / name)


def test_data_tar_and_folder(tiny_data: Path, tmp_path: Path) -> None:
    split = data.load_any(tiny_data / "train.tar", None, "train")
    assert split.x.shape == (48, 3, 32, 32) and split.x.dtype == torch.uint8
    for i in range(3):
        d = tmp_path / "imgs" / data.CLASSES[i]
        d.mkdir(parents=True)
        Image.fromarray(split.x[i].permute(1, 2, 0).numpy()).save(d / "a.png")
    folder = data.load_any(tmp_path / "imgs", None, "train")
    assert folder.y.tolist() == [0, 1, 2]
    assert torch.equal(folder.x, split.x[:3])
    stream = data.BatchStream(split, 16, seed=0)
    xb, yb = next(stream)
    assert xb.shape == (16, 3, 32, 32) and xb.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(FileNotFoundError):
        data.resolve(tmp_path / "nowhere", None, None)


def test_tiny_study_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    cfg = config.from_dict({
        "name": "tiny", "out": str(tmp_path / "run"), "data": {"path": str(tiny_data)}, "model": {"arch": "resnet8"},
        "teacher": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
        "prune": {"budgets": [0.5], "methods": ["sparsity", "l2", "tp_l1", "tp_groupnorm"], "decay_steps": 3,
                  "finetune_steps": 2, "batch_size": 8, "tp_iterative_steps": 50},
        "report": {"latency_batch": 2, "latency_rounds": 1, "latency_runs": 1}})
    results, plots = pipeline.prune(cfg)
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"sparsity", "l2", "tp_l1", "tp_groupnorm"}
    teacher_macs = results["teacher"]["macs"]
    for r in runs.values():
        assert r["reload_exact"], r["method"]
        assert r["accuracy_reloaded"] == r["accuracy"]
        assert r["macs"] <= 0.5 * teacher_macs * 1.03, r["method"]
        assert r["macs"] >= 0.5 * teacher_macs * 0.85, r["method"]
    assert runs["sparsity"]["cut_jump"] == 0.0 and runs["l2"]["cut_jump"] > 0
    assert runs["sparsity"]["export_rel_diff"] < 1e-4
    for p in plots:
        assert Path(p).is_file()
    out = Path(cfg.out_dir)
    assert (out / "sparsity-0.5" / "history.json").is_file() and not (out / "tp_l1-0.5" / "history.json").exists()
    assert json.loads((out / "results.json").read_text())["runs"][0]["method"] == "sparsity"
    assert "tp_groupnorm" in table(results)
    # a maskdecay student reloads with the public API alone and gives the same logits
    student = methods.load_student(out / "sparsity-0.5" / "student.pt", "resnet8")
    again = md.load_pruned(out / "sparsity-0.5" / "student.pt", lambda: models.build("resnet8"))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert torch.equal(student(x), again.to(memory_format=torch.channels_last).eval()(x))
    # a second run reuses the finished runs (resume)
    results2, _ = pipeline.prune(cfg)
    assert [r["accuracy"] for r in results2["runs"]] == [r["accuracy"] for r in results["runs"]]


def test_speedup_command(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    speedup.add_arguments(parser)
    args = parser.parse_args(["--arch", "resnet8", "--batch", "2", "--rounds", "1", "--runs", "1",
                              "--json", str(tmp_path / "s.json")])
    speedup.main(args)
    r = json.loads((tmp_path / "s.json").read_text())
    assert r["mac_reduction"] == pytest.approx(2.0, rel=0.06)
    assert r["speedup"] > 0 and r["ratio"] == pytest.approx(r["speedup"] / r["mac_reduction"])


def test_progress_bar_not_redrawn_by_the_loss(capfd: pytest.CaptureFixture[str]) -> None:
    """Setting the loss postfix must not redraw the bar: tqdm's iterator publishes its step count only on its own
    refreshes, so a redraw showed "0/60 ... loss=..." and, in a log file, one extra line per postfix."""
    model = torch.nn.Linear(4, 10)
    stream = iter([(torch.randn(8, 4), torch.randint(0, 10, (8,)))] * 60)
    training.run_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), stream, 60, lambda i: 1.0, desc="t")
    frames = [f for f in capfd.readouterr().err.split("\r") if f.strip()]
    assert frames and not any("loss=" in f for f in frames if " 0/60 " in f)
    assert len(frames) <= 2, frames  # the bar's start and its clearing (leave=False); no redraw in between
