"""The study driver's plan: which evc commands it runs, and with which step counts."""
from __future__ import annotations

import argparse
import os

from maskdecay_examples.evc.training.study import plan_jobs

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "evc", "configs")


def _args(**kw):
    a = dict(out="OUT", teacher="T.pt", student_config=os.path.join(CONFIGS, "mini_student.yaml"),
             scratch_config=os.path.join(CONFIGS, "mini_teacher.yaml"), train_data="D", kodak="K", device="cpu",
             eval_args=[], seeds=[0], students=["SS"], methods=["sparsity", "oneshot", "scratch_long"], rrl=True,
             overrides=["decay.steps=20", "decay.finetune_steps=10", "train.threads=1"])
    a.update(kw)
    return argparse.Namespace(**a)


def test_plan_step_counts_reach_every_run_as_flags():
    jobs = {j.name: j for j in plan_jobs(_args())}
    sparsity, oneshot = jobs["SS-sparsity-s0"].argv, jobs["SS-oneshot-s0"].argv
    # a --set of decay.steps would override --steps, so the step keys travel only as flags
    assert "decay.steps=20" not in " ".join(sparsity) and "train.threads=1" in sparsity
    assert sparsity[-4:] == ["--steps", "20", "--finetune-steps", "10"]
    assert oneshot[-4:] == ["--steps", "1", "--finetune-steps", "29"]
    assert jobs["rrl_oneshot-SS-s0"].argv[-4:] == ["--steps", "1", "--finetune-steps", "29"]
    assert "train.steps=2030" in jobs["SS-scratch_long-s0"].argv  # teacher's 2,000 + the student's 30
    # RRL waits for its base student; every model gets an evaluation; trainings come first, RRL first among them
    assert jobs["rrl-SS-s0"].needs == [os.path.join("OUT", "SS-sparsity-s0", "student.pt")]
    assert {j.name for j in jobs.values() if j.name.startswith("eval rrl-SS-s0")} == {
        *(f"eval rrl-SS-s0-level{k}" for k in range(1, 5)), "eval rrl-SS-s0-best"}
    assert list(jobs)[0].startswith("rrl") and "eval teacher" in jobs
