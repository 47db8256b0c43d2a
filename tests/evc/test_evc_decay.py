"""evc decay: stage widths -> plan, teacher -> EVC student (strict layout), encode/decode, exact resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maskdecay_examples import evc
from maskdecay_examples.evc.cli.main import main as cli
from maskdecay_examples.evc.cli.imageio import to_uint8
from maskdecay_examples.evc.training.config import load_config
from maskdecay_examples.evc.training.decay import attach_masks, run_decay, stage_plan, student_spec

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KODAK = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "kodak"))
TINY = os.path.join(ROOT, "examples", "evc", "configs", "tiny.yaml")
needs_kodak = pytest.mark.skipif(not os.path.isdir(KODAK), reason="shared Kodak images not available")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A random-init mini EVC_LL teacher (the pipeline does not need a trained one)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    evc.save_model(evc.build_model("mini_EVC_LL"), path)
    return path


def test_student_spec_and_stage_plan():
    t = evc.build_model("mini_EVC_LL")
    assert student_spec(t, "EVC_SS") == ("mini_EVC_SS", (16, 16, 32, 48), (16, 16, 32, 48))
    assert student_spec(t, "mini_EVC_LM") == ("mini_EVC_LM", (48, 48, 48, 48), (32, 32, 48, 48))
    with pytest.raises(ValueError, match="nothing to decay"):
        student_spec(t, "EVC_LL")
    with pytest.raises(ValueError, match="exceed"):
        student_spec(evc.build_model("mini_EVC_SS"), "EVC_MM")
    with pytest.raises(ValueError, match="mini model but the teacher is full-size"):
        student_spec(evc.build_model("EVC_SS"), "mini_EVC_SS")
    for student, n_groups in (("EVC_SS", 24), ("EVC_SL", 12), ("EVC_LS", 12)):
        name, enc, dec = student_spec(t, student)
        masks = attach_masks(t, enc != t.enc_widths, dec != t.dec_widths)
        plan = stage_plan(masks, t, enc, dec)
        assert len(masks.groups) == n_groups
        w = plan.widths
        if student != "EVC_LS":  # encoder stage 1: resblock inner / stage stream / depthconv inner / FFN hidden
            assert [w["enc.0.conv1"], w["enc.0.conv2"], w["enc.1.block.0.conv1.0"], w["enc.1.block.1.conv.0"]] \
                == [16, 16, 16, 64]
            assert w["enc.4.conv2"] == 32
        if student != "EVC_SL":  # decoder: C3 stage after the latent, sub-pixel units
            assert [w["dec.1.subpel_conv.0"], w["dec.1.conv"], w["dec.6.block.1.conv.0"]] == [32, 32, 64]
        masks.remove()


@needs_kodak
def test_decay_to_ss_loads_strict_and_codes(teacher_ckpt, tmp_path, capsys):
    """At mini scale: evc decay --student EVC_SS -> EVC_SS layout (strict) -> evc encode/decode."""
    out = tmp_path / "ss"
    rc = cli(["decay", "--config", TINY, "--teacher", teacher_ckpt, "--student", "EVC_SS", "--regularizer",
              "sparsity", "--out", str(out), "--no-progress", "--set", f"data.train={KODAK}",
              "--set", f"val.data={KODAK}", "--set", "decay.distill_latent=0.1"])
    assert rc == 0, capsys.readouterr().err
    student = evc.load_model(out / "student.pt", arch="mini_EVC_SS")  # strict load into the plain class
    ref = evc.build_model("mini_EVC_SS").state_dict()
    sd = student.state_dict()
    assert sd.keys() == ref.keys() and all(sd[k].shape == ref[k].shape for k in ref)
    assert evc.load_model(out / "student.pt").enc_widths == (16, 16, 32, 48)
    hist = json.loads((out / "history.json").read_text())
    assert hist["removed_max"][-1] == 0.0 and hist["kept_min"][-1] == 1.0
    assert [r["step"] for r in map(json.loads, (out / "finetune" / "log.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]
    img = tmp_path / "crop.png"
    Image.open(os.path.join(KODAK, "kodim05.png")).crop((0, 0, 80, 48)).save(img)
    assert cli(["encode", str(img), str(tmp_path / "c.evc"), "--model", str(out / "student.pt"),
                "--arch", "mini_EVC_SS", "--rate-index", "1"]) == 0
    assert cli(["decode", str(tmp_path / "c.evc"), str(tmp_path / "d.png"), "--model", str(out / "student.pt"),
                "--arch", "mini_EVC_SS"]) == 0
    x, _, _ = evc.load_image(str(img))
    rec = to_uint8(evc.reconstruct(student, x, evc.select_rate(student, rate_index=1))["x_hat"])
    assert (rec == np.asarray(Image.open(tmp_path / "d.png"))).all()


@needs_kodak
def test_decay_resume_and_one_sided_students(teacher_ckpt, tmp_path):
    base = [f"data.train={KODAK}", "val.images=0", f"decay.teacher={teacher_ckpt}", "decay.student=EVC_SL",
            "decay.regularizer=l1", "decay.steps=4", "decay.finetune_steps=0"]
    cfg = load_config(TINY, base)
    a = run_decay(cfg, str(tmp_path / "a"), progress=False)
    assert a["done"] and evc.load_model(a["path"], arch="mini_EVC_SL").dec_widths == (48, 48, 48, 48)
    # killed after decay step 3 (checkpoint at 3), resumed: same masks trajectory and the same student
    b = run_decay(cfg, str(tmp_path / "b"), stop_after=3, progress=False)
    assert not b["done"]
    b = run_decay(cfg, str(tmp_path / "b"), resume=True, progress=False)
    la, lb = ((tmp_path / x / "decay" / "log.jsonl").read_text().splitlines() for x in "ab")
    pick = [(r["step"], r["loss"], r["removed_max"]) for r in map(json.loads, la) if "loss" in r]
    assert pick == [(r["step"], r["loss"], r["removed_max"]) for r in map(json.loads, lb) if "loss" in r]
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a["path"], b["path"]))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ls = run_decay(load_config(TINY, base + ["decay.student=EVC_LS", "decay.regularizer=hard"]),
                   str(tmp_path / "ls"), progress=False)
    assert evc.load_model(ls["path"], arch="mini_EVC_LS").enc_widths == (48, 48, 48, 48)
