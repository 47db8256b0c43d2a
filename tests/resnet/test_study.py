"""The converged study: resumable batches, the validation split, sweeps with edge extension, finals, seeds, the
ablation, a kill-and-resume that gives bit-identical results, and the report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import maskdecay as md
from maskdecay_examples import yaml_config
from maskdecay_examples.resnet import config, pipeline, study, study_report
from maskdecay_examples.resnet.__main__ import main as cli
from maskdecay_examples.resnet.data import Split
from maskdecay_examples.resnet.stream import StepStream, carve

from tests.resnet.tiny_cifar import cifar_tar


def _split(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def test_stream_batches_depend_only_on_step() -> None:
    split = _split(40)
    a, b = StepStream(split, 8, 3), StepStream(split, 8, 3)
    order = [7, 0, 5, 5, 12, 1]
    for i in order:  # any access order gives the same batch i
        xa, ya = a.batch(i)
        xb, yb = b.batch(i)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], StepStream(split, 8, 4).batch(0)[0])
    epoch = torch.cat([a.batch(i)[1] for i in range(5)])
    assert sorted(epoch.tolist()) == sorted(split.y.tolist())  # one epoch visits every image once


def test_carve_is_stratified_and_disjoint() -> None:
    split = Split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 32, 32).clone(),
                  torch.arange(100) % 10)
    train, val = carve(split, 20, 0)
    assert len(train) == 80 and len(val) == 20
    assert torch.bincount(val.y).tolist() == [2] * 10
    ids = set(train.x[:, 0, 0, 0].tolist()) | set(val.x[:, 0, 0, 0].tolist())
    assert len(ids) == 100
    with pytest.raises(ValueError, match="validation size"):
        carve(split, 0, 0)


def _cfg(root: Path, out: Path, **prune) -> study.StudyConfig:
    raw = {"name": "t", "out": str(out), "arch": "resnet8",
           "data": {"path": str(root), "val_size": 16, "cache": False},
           "teacher": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
           "prune": {"budgets": [0.5], "methods": ["sparsity", "hard", "tp_l1", "tp_groupnorm"],
                     "ablation_budgets": [0.5], "decay_epochs": 1, "finetune_epochs": 2, "sweep_finetune_epochs": 1,
                     "batch_size": 16, "sweep": {"hard": [0.5, 1.0], "sparsity": [0.01, 0.1],
                                                 "sparsity_loss_only": [0.1, 1.0],
                                                 "tp_groupnorm": [0.001, 0.01]},
                     "sweep_extend": 1, "seed_top": 1, "seed_methods": ["hard"], "extra_seeds": [1],
                     "tp_iterative_steps": 50, **prune}}
    return yaml_config.config_from_dict(study.StudyConfig, raw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    cifar_tar(root / "train.tar", 96, 0)
    cifar_tar(root / "test.tar", 30, 1)
    return root


def test_config_errors() -> None:
    with pytest.raises(yaml_config.ConfigError, match="unknown method 'foo'"):
        yaml_config.config_from_dict(study.StudyConfig, {"prune": {"methods": ["foo"]}})
    with pytest.raises(yaml_config.ConfigError, match="give a grid for sparsity"):
        yaml_config.config_from_dict(study.StudyConfig, {"prune": {"methods": ["sparsity"], "sweep": {}}})
    with pytest.raises(yaml_config.ConfigError, match="seed_methods: 'l1' is not one of the methods"):
        yaml_config.config_from_dict(study.StudyConfig, {"prune": {"methods": ["hard"], "ablation_budgets": [],
                                                          "seed_methods": ["l1"]}})
    with pytest.raises(yaml_config.ConfigError, match="not a method with a strength"):
        yaml_config.config_from_dict(study.StudyConfig, {"prune": {"methods": ["tp_l1"], "ablation_budgets": [],
                                                          "sweep": {"tp_l1": [1.0]}}})
    with pytest.raises(yaml_config.ConfigError, match=r"sweep.hard: fractions of the decay phase, in \(0, 1\]"):
        yaml_config.config_from_dict(study.StudyConfig, {"prune": {"methods": ["hard"], "ablation_budgets": [],
                                                          "sweep": {"hard": [0.5, 2.0]}}})


def test_study_end_to_end_and_report(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tiny, tmp_path / "s")
    summary = study.run(cfg)
    finals = summary["finals"]
    names = [(f["method"], f["seed"]) for f in finals]
    # the ablation's pieces first (its seeds need no ranking), then the other methods, then the best one's seeds
    assert names[:6] == [("sparsity", 0), ("hard", 0), ("sparsity_loss_only", 0), ("hard", 1), ("tp_l1", 0),
                         ("tp_groupnorm", 0)]
    best = max((f for f in finals[:6] if f["seed"] == 0 and f["method"] in cfg.prune.methods),
               key=lambda f: f["val_accuracy"])["method"]
    again = {f["method"] for f in finals if f["seed"] == 1}  # the best method and `seed_methods` with seed 1
    assert again == {best, "hard"} and len(finals) == 5 + len(again)
    teacher_macs = summary["teacher_macs"]
    for f in finals:
        assert 0.4 * teacher_macs < f["macs"] <= 0.5 * teacher_macs * 1.03, f["run"]
        assert f["total_steps"] == 3 * 5  # every method: 1 decay + 2 fine-tune epochs of 5 steps
        assert "test_accuracy" in f
    by = {f["method"]: f for f in finals if f["seed"] == 0}
    assert by["tp_l1"]["strength"] is None and by["tp_l1"]["sweep"] == []
    assert {p["strength"] for p in by["hard"]["sweep"]} >= {0.5, 1.0}  # hard decay: the length of its schedule
    assert {p["strength"] for p in by["sparsity"]["sweep"]} >= {0.01, 0.1}
    # the sweep never saw the test set: its points carry validation accuracy only
    for p in (tmp_path / "s" / "runs").glob("*/result-ft1.json"):
        assert "test_accuracy" not in p.read_text()
    # the saved final students reload with their accuracy
    out = tmp_path / "s"
    student = study.load_student(out / "runs" / by["tp_l1"]["run"], "resnet8")
    assert md.count_macs(student, torch.randn(1, 3, 32, 32)) == by["tp_l1"]["macs"]
    # a second call reuses everything
    again = study.run(cfg)
    assert [f["val_accuracy"] for f in again["finals"]] == [f["val_accuracy"] for f in finals]
    # with the first piece to redo, summary.json lists every finished piece before that piece runs (the seeds of the
    # best methods wait for the ranking)
    (tmp_path / "s" / "runs" / finals[0]["run"] / "result-ft2.json").unlink()
    monkeypatch.setattr(study.Study, "_finetune", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        study.run(cfg)
    monkeypatch.undo()
    listed = json.loads((tmp_path / "s" / "summary.json").read_text())["finals"]
    assert [f["run"] for f in listed] == [f["run"] for f in finals[1:] if f["seed"] == 0 or f["method"] == "hard"]
    # `make demo` prunes the study's teacher through the prune pipeline, scored on the demo's own test images
    demo = config.from_dict({
        "name": "demo", "out": str(tmp_path / "demo"), "data": {"path": str(tiny), "test_subset": 20},
        "model": {"arch": "resnet8"}, "teacher": {"checkpoint": str(out / "teacher.pt")},
        "prune": {"budgets": [0.5], "methods": ["hard"], "decay_steps": 2, "finetune_steps": 1, "batch_size": 8},
        "report": {"latency_batch": 2, "latency_rounds": 1, "latency_runs": 1}})
    results, _ = pipeline.prune(demo)
    assert results["teacher"]["reused"] and results["runs"][0]["reload_exact"]
    threads = torch.get_num_threads()
    try:
        assert cli(["study-report", str(out), "--batch", "2", "--rounds", "1", "--runs", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = (out / "report.md").read_text()
    assert "1 thread; median of 1 rounds x 1 passes" in text
    for bad in (["--rounds", "0"], ["--threads", "0"]):
        assert cli(["study-report", str(out), *bad]) == 2
    # students of the same shapes (hard decay and the loss-only arm share the plan's) are timed once
    lat = study_report.measure_speed(out, study_report.load(out), batch=2, rounds=1, runs=1)
    assert lat[by["hard"]["run"]] == lat[by["sparsity_loss_only"]["run"]]
    assert {"teacher", by["tp_l1"]["run"], by["tp_groupnorm"]["run"]} < set(lat)
    for needle in ("Main table", "Strength sweeps", "Seeds", "Sparsity-loss ablation", "speed-up",
                   "What the strength does", "| ceiling only (hard decay) | 0.5 |", "| loss only (no ceiling) | 0.1 |",
                   "CPU latency: one eval forward of 2 images"):
        assert needle in text
    assert "phases on: " in text and re.search(r"\d+ threads? \(", text)  # where every decay and fine-tuning ran
    assert re.search(r"\| teacher \| – \| 1 \| – \| [\d.]+ \| – \| [\d.]+ M \| \d+ k \|", text)
    # a sweep point whose student missed the budget says so
    point = next((out / "runs").glob("hard-0.5-s*-seed0/result-ft1.json"))
    res = json.loads(point.read_text())
    res["macs"] = 0.3 * teacher_macs
    point.write_text(json.dumps(res))
    text = study_report.main(out, measure=False)
    assert text.count(f"({0.3 * teacher_macs / 1e6:.2f} M MACs)") == 1
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"# Results\n\nbefore\n\n{study_report.BEGIN}\nOLD-BLOCK\n{study_report.END}\n\nafter\n")
    for _ in range(2):  # publishing again replaces the block
        study_report.main(out, measure=False, docs=page)
    doc = page.read_text()
    assert doc.startswith("# Results\n\nbefore") and doc.endswith("after\n") and "OLD-BLOCK" not in doc
    assert doc.count("Main table") == 1 and "](img/s_teacher_curve.png)" in doc
    assert (page.parent / "img" / "s_accuracy_vs_macs.png").is_file()
    page.write_text("no markers")
    with pytest.raises(ValueError, match="study-report:begin"):
        study_report.main(out, measure=False, docs=page)
    for name in ("teacher_curve.png", "accuracy_vs_macs.png", "ablation_0.5.png", "masks_0.5.png"):
        assert (out / "plots" / name).is_file()


class _Killed(Exception):
    pass


def test_killed_run_resumes_bit_identically(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prune = {"methods": ["sparsity"], "ablation_budgets": [], "seed_top": 0, "seed_methods": [], "decay_epochs": 2}
    ref_cfg = _cfg(tiny, tmp_path / "ref", **prune)
    ref = study.run(ref_cfg)["finals"][0]

    cfg = _cfg(tiny, tmp_path / "cut", **prune)
    save = md.atomic_save
    calls = {"n": 0}

    def flaky(obj: object, path: str) -> None:
        save(obj, path)
        if "state" in str(path) and "teacher" not in str(path):
            calls["n"] += 1
            if calls["n"] in (1, 4):  # after the first decay epoch, and again inside a fine-tuning
                raise _Killed(path)

    monkeypatch.setattr(md, "atomic_save", flaky)
    for _ in range(2):
        with pytest.raises(_Killed):
            study.run(cfg)
    monkeypatch.setattr(md, "atomic_save", save)
    got = study.run(cfg)["finals"][0]
    assert got["val_accuracy"] == ref["val_accuracy"] and got["test_accuracy"] == ref["test_accuracy"]
    a = torch.load(tmp_path / "ref" / "runs" / ref["run"] / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "runs" / got["run"] / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_penalties_sweep_both_ways_of_choosing_units(tiny: Path, tmp_path: Path) -> None:
    """With ``select: [plan, cut]`` an L1 penalty is swept both ways (the plan's units, or those whose masks it shrank
    most, at the plan's widths) and the final run takes the better one on validation."""
    prune = {"methods": ["l1"], "ablation_budgets": [], "seed_top": 0, "seed_methods": [], "sweep": {"l1": [0.05]},
             "select": ["plan", "cut"]}
    final = study.run(_cfg(tiny, tmp_path / "l1", **prune))["finals"][0]
    runs = tmp_path / "l1" / "runs"
    assert {p.name for p in runs.iterdir()} == {"l1-0.5-s0.05-seed0", "l1-0.5-s0.05-cut-seed0"}
    cut = json.loads((runs / "l1-0.5-s0.05-cut-seed0" / "history.json").read_text())
    assert cut["select"] == "cut" and 0.0 <= cut["reselected"] <= 1.0
    assert json.loads((runs / "l1-0.5-s0.05-seed0" / "history.json").read_text())["select"] == "plan"
    points = {q["select"]: q["val_accuracy"] for q in final["sweep"]}
    assert set(points) == {"plan", "cut"} and points[final["select"]] == max(points.values())
    student = study.load_student(runs / final["run"], "resnet8")
    assert md.count_macs(student, torch.randn(1, 3, 32, 32)) == final["macs"]
    with pytest.raises(yaml_config.ConfigError, match="select: one or both of plan, cut"):
        _cfg(tiny, tmp_path / "bad", **{**prune, "select": ["end"]})


def test_sparsity_loss_both_ways_and_its_ablation_arm(tiny: Path, tmp_path: Path) -> None:
    """The sparsity loss is swept both ways (the cut way: every mask pulled, no ceiling); the ablation keeps its own
    arm, the plan's way, with its seeds, whichever way wins the main table."""
    prune = {"methods": ["sparsity"], "seed_top": 0, "seed_methods": ["sparsity"], "extra_seeds": [1],
             "sweep": {"sparsity": [0.1], "sparsity_loss_only": [0.1]}, "select": ["plan", "cut"]}
    summary = study.run(_cfg(tiny, tmp_path / "sp", **prune))
    runs = tmp_path / "sp" / "runs"
    cut = json.loads((runs / "sparsity-0.5-s0.1-cut-seed0" / "history.json").read_text())
    assert cut["select"] == "cut" and cut["regularizer"]["scope"] == "all" and not cut["regularizer"]["ceiling"]
    main = [f for f in summary["finals"] if f["method"] == "sparsity" and "arm" not in f]
    arms = [f for f in summary["finals"] if f["method"] == "sparsity" and "arm" in f]
    assert [f["seed"] for f in main] == [0] and {q["select"] for q in main[0]["sweep"]} == {"plan", "cut"}
    assert sorted(f["seed"] for f in arms) == [0, 1]
    assert all(f["select"] == "plan" and f["arm"] == "plan" and "-cut" not in f["run"] for f in arms)
    text = study_report.main(tmp_path / "sp", measure=False)
    row = next(line for line in text.splitlines() if line.startswith("| loss + ceiling (sparsity loss) | 0.5 |"))
    assert "(n=2)" in row  # the arm's two seeds
    # "What the strength does" shows the plan way only: the cut way has no ceiling
    strength = text[text.index("**What the strength does**"):].split("\n\n")[1]
    assert sum(line.startswith("| loss + ceiling (sparsity loss) | 0.1 |") for line in strength.splitlines()) == 1


def test_an_arm_run_the_chosen_way_counts_as_its_method_seed() -> None:
    """The ablation arm's seeds are the method's own seeds when the main run chose the arm's way, and not otherwise."""
    def final(method: str, seed: int, select: str, arm: bool = False) -> dict:
        run = f"{method}-0.5-s1{'-cut' if select == 'cut' else ''}-seed{seed}"
        return {"run": run, "method": method, "budget": 0.5, "seed": seed, "select": select,
                **({"arm": "plan"} if arm else {})}

    finals = [final("sparsity", 0, "plan"), final("sparsity", 0, "plan", True), final("sparsity", 1, "plan", True),
              final("l1", 0, "cut"), final("l1", 0, "plan", True), final("l1", 1, "plan", True)]
    got = study_report.main_finals({"config": {"seed": 0}, "finals": finals})
    assert [f["run"] for f in got] == ["sparsity-0.5-s1-seed0", "sparsity-0.5-s1-seed1", "l1-0.5-s1-cut-seed0"]


def test_carve_uneven_classes() -> None:
    y = torch.tensor([0] * 9 + [1] * 10 + [2] * 10 + [3] * 11)
    split = Split(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), y)
    train, val = carve(split, 7, 1)
    assert len(val) == 7 and len(train) == 33
    assert all(abs(int(c) - 7 * n / 40) < 1 for c, n in zip(torch.bincount(val.y), (9, 10, 10, 11)))


def test_gpu_recipe_smoke_on_cpu(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU recipe's config, run on the CPU at a tiny scale: the schedule is sized from the step times
    (plan.json), bf16 autocast trains, no validation split, every method finishes at its budget."""
    # the probe runs as on a GPU, but reports a fixed step time: the schedule then does not depend on this machine
    probe = study._seconds_per_step
    monkeypatch.setattr(study, "_seconds_per_step", lambda *a, **k: (probe(*a, n=2, **k), 0.4)[1])
    root = Path(__file__).resolve().parents[2]
    cfg = study.load_config(root / "examples/resnet/configs/resnet56_gpu.yaml", [
        "device=cpu", "channels_last=false", "arch=resnet8", f"data.path={tiny}", "data.cache=false",
        f"out={tmp_path / 'gpu'}", "teacher.epochs=1", "teacher.batch_size=16", "prune.batch_size=16",
        "fit_minutes=0.5", "prune.tp_iterative_steps=50"])
    assert cfg.amp and cfg.data.val_size == 0
    summary = study.run(cfg)
    plan = json.loads((tmp_path / "gpu" / "plan.json").read_text())
    assert plan["seconds_per_step"]["decay"] == 0.4 and plan["decay_epochs"] == plan["finetune_epochs"] == 1
    finals = {f["method"]: f for f in summary["finals"]}
    assert set(finals) == {"sparsity", "hard", "tp_groupnorm"}
    for f in finals.values():
        assert f["val_accuracy"] is None and f["macs"] <= 0.47 * summary["teacher_macs"] * 1.03
    text = study_report.main(tmp_path / "gpu", measure=False)  # a report without a validation split
    assert "| sparsity | plan (l1), on the teacher | 0.47 | 10 |" in text
    assert "| hard | plan (l1), on the teacher | 0.47 | 0.1 |" in text
    with pytest.raises(yaml_config.ConfigError, match="one strength per method"):
        study.load_config(root / "examples/resnet/configs/resnet56_gpu.yaml", ["prune.sweep.sparsity=[0.1, 1.0]"])
