"""Several study processes on one folder: exclusive claims released on death, and shared work with equal results."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest

from maskdecay_examples.resnet import claim, study
from maskdecay_examples.resnet.claim import Busy, gather

from tests.resnet.test_study import _cfg
from tests.resnet.tiny_cifar import cifar_tar

pytestmark = pytest.mark.skipif(claim.fcntl is None, reason="claims need fcntl (POSIX)")

HOLD = """
import sys, time
from pathlib import Path
from maskdecay_examples.resnet.claim import claim
with claim(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_claim_is_exclusive_and_dies_with_its_process(tmp_path: Path) -> None:
    lock = tmp_path / "state" / "piece.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="piece"):
            with claim.claim(lock):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait()
    with claim.claim(lock):
        pass


def test_gather_comes_back_to_held_jobs() -> None:
    held = {"b": 2}
    calls: list[str] = []

    def job(name: str) -> str:
        calls.append(name)
        if held.get(name, 0) > 0:
            held[name] -= 1
            raise Busy(name)
        return name.upper()

    jobs = {k: (lambda k=k: job(k)) for k in "abc"}
    seen: list[list[str]] = []
    assert gather(jobs, wait=True, poll=0, on_done=lambda r: seen.append(list(r))) == {"a": "A", "b": "B", "c": "C"}
    assert calls == ["a", "b", "c", "b", "b"]
    assert seen == [["a"], ["a", "c"], ["a", "b", "c"]]
    held["b"] = 1
    with pytest.raises(Busy, match="b"):
        gather({"b": jobs["b"]}, wait=False)
    held["b"] = 1  # freed while another job of the same pass runs: looked at again before giving up
    assert gather({"b": jobs["b"], "c": jobs["c"]}, wait=False) == {"b": "B", "c": "C"}


def test_gather_adds_the_jobs_that_results_make_possible() -> None:
    held = {"b": 2}

    def job(name: str) -> str:
        if held.get(name, 0) > 0:
            held[name] -= 1
            raise Busy(name)
        return name.upper()

    def more(results: dict) -> dict:  # "d" needs "a" only; "e" needs "b"
        new = {}
        if "a" in results:
            new["d"] = lambda: job("d")
        if "b" in results:
            new["e"] = lambda: job("e")
        return new

    order: list[list[str]] = []
    jobs = {k: (lambda k=k: job(k)) for k in "abc"}
    got = gather(jobs, wait=True, poll=0, on_done=lambda r: order.append(list(r)), more=more)
    assert got == {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}
    # "d" is listed after "a" and runs while "b" is still held; results follow the order of the jobs
    assert order == [["a"], ["a", "c"], ["a", "c", "d"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]]
    assert list(got) == ["a", "b", "c", "d", "e"]


def _worker(cfg_args: tuple, log: str, start: "mp.synchronize.Barrier") -> None:
    """One study process that records which runs it fine-tuned itself; the workers start together."""
    original = study.Study._finetune

    def traced(self, run, epochs, final, path, key):  # noqa: ANN001, ANN202
        with open(log, "a") as f:
            f.write(f"{run.name} ft{epochs}\n")
        return original(self, run, epochs, final, path, key)

    study.Study._finetune = traced
    claim.POLL_SECONDS = 0.2
    cfg = _cfg(*cfg_args[:2], **cfg_args[2])
    start.wait(timeout=300)
    study.run(cfg)


def test_two_processes_share_a_study_and_match_one(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    cifar_tar(root / "train.tar", 96, 0)
    cifar_tar(root / "test.tar", 30, 1)
    prune = {"methods": ["sparsity", "hard", "tp_l1"], "ablation_budgets": [], "seed_top": 1, "extra_seeds": [1]}
    ref = study.run(_cfg(root, tmp_path / "one", **prune))["finals"]

    shared = tmp_path / "two"
    study.run(_cfg(root, shared, **prune), stage="teacher")  # both workers then start from the same teacher
    ctx = mp.get_context("spawn")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    start = ctx.Barrier(len(logs))
    procs = [ctx.Process(target=_worker, args=((root, shared, prune), str(log), start)) for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    done = [line for log in logs if log.exists() for line in log.read_text().splitlines()]
    assert sorted(done) == sorted(set(done))  # no piece ran twice
    assert all(log.exists() for log in logs)  # and both processes worked
    got = json.loads((shared / "summary.json").read_text())["finals"]
    assert [(f["run"], f["val_accuracy"], f["test_accuracy"]) for f in got] == \
           [(f["run"], f["val_accuracy"], f["test_accuracy"]) for f in ref]
