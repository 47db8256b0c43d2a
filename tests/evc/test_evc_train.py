"""evc train: config validation, data, quantisation proxy, exact resume, non-finite guard, AMP, 2-process DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from maskdecay_examples import evc
from maskdecay_examples.evc.training.config import Config, config_from_dict, load_config
from maskdecay_examples.evc.training.data import RandomCropBatches, load_val_images
from maskdecay_examples.evc.training.train import Dist, Hooks, RDObjective, run_training, train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KODAK = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "kodak"))
TINY = os.path.join(ROOT, "examples", "evc", "configs", "tiny.yaml")
needs_kodak = pytest.mark.skipif(not os.path.isdir(KODAK), reason="shared Kodak images not available")


def tiny(*overrides: str) -> Config:
    return load_config(TINY, [f"data.train={KODAK}", f"val.data={KODAK}", "val.images=0", *overrides])


def records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_config_validation(tmp_path):
    for cfg in ("mini_teacher.yaml", "tiny.yaml", "mini_student.yaml", "full_teacher.yaml", "full_student.yaml"):
        load_config(os.path.join(ROOT, "examples", "evc", "configs", cfg))
    with pytest.raises(ValueError, match=r"unknown key 'train\.stepz'"):
        config_from_dict({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown key 'trian'"):
        config_from_dict({"trian": {}})
    with pytest.raises(ValueError, match=r"optim\.lr: expected a number"):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ValueError, match=r"train\.steps: expected an integer"):
        config_from_dict({"train": {"steps": 1.5}})
    with pytest.raises(ValueError, match="multiple of 64"):
        config_from_dict({"data": {"crop": 100}})
    with pytest.raises(ValueError, match="model.arch"):
        config_from_dict({"model": {"arch": "Scale_EVC_SS"}})
    with pytest.raises(ValueError, match="decay.regularizer"):
        config_from_dict({"decay": {"regularizer": "l3"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    assert load_config(None, ["train.steps=7", "optim.betas=[0.8, 0.9]"]).train.steps == 7


def test_crops_greyscale_small_and_step_keyed(tmp_path):
    Image.new("L", (40, 30), 128).save(tmp_path / "grey_small.png")
    Image.new("RGBA", (100, 90), (10, 200, 30, 0)).save(tmp_path / "rgba.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = RandomCropBatches(str(tmp_path), crop=64, batch=3, seed=1)
    x, rate = ds[5]
    assert x.shape == (3, 3, 64, 64) and 0 <= rate < 4 and 0 <= float(x.min()) and float(x.max()) <= 1
    x2, rate2 = RandomCropBatches(str(tmp_path), crop=64, batch=3, seed=1)[5]
    assert torch.equal(x, x2) and rate == rate2  # a pure function of (seed, step, rank)
    assert not torch.equal(ds[6][0], x) or ds[6][1] != rate
    assert len(RandomCropBatches(str(tmp_path), crop=64, batch=1, seed=0, small="skip").files) == 1
    with pytest.raises(ValueError, match="no image is at least"):
        RandomCropBatches(str(tmp_path), crop=128, batch=1, seed=0, small="skip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        RandomCropBatches(str(tmp_path / "empty"), crop=64, batch=1, seed=0)
    assert load_val_images(str(tmp_path), 2, 64).shape == (2, 3, 64, 64)


def test_quantisation_proxy():
    torch.manual_seed(0)
    m = evc.build_model("mini_EVC_SS").train()
    x = torch.rand(2, 3, 64, 64)
    q = m.q_scale[1].view(1, 1, 1, 1)
    hard = m(x, q, quant="round")
    ste = m(x, q, quant="ste")
    mixed = m(x, q, quant="mixed")
    mixed2 = m(x, q, quant="mixed")
    # the decoder sees the rounded latents in every mode; STE rates are the hard-rounding rates
    assert torch.equal(mixed["x_hat"], hard["x_hat"]) and torch.equal(ste["x_hat"], hard["x_hat"])
    assert torch.equal(ste["bits_y"], hard["bits_y"])
    # mixed: rates on latent + uniform noise (differs between calls), gradients reach the encoder
    assert not torch.equal(mixed["bits_y"], mixed2["bits_y"])
    (mixed["bits_y"].sum() + mixed["x_hat"].square().mean()).backward()
    assert m.enc[0].conv1.weight.grad.abs().sum() > 0 and m.q_scale.grad[1].abs() > 0


@needs_kodak
def test_resume_continues_identically(tmp_path):
    """Exact resume: N steps straight == killed after step 4 (last checkpoint at 3) + --resume."""
    cfg = tiny("val.images=1")
    a, _ = train(cfg, str(tmp_path / "a"), progress=False)
    _, s = train(cfg, str(tmp_path / "b"), stop_after=4, progress=False)
    assert s["step"] == 4 and not os.path.exists(tmp_path / "b" / "model.pt")
    b, _ = train(cfg, str(tmp_path / "b"), resume=True, progress=False)
    la = [(r["step"], r["loss"], r["bpp"], r["mse"], r["lr"]) for r in records(tmp_path / "a" / "log.jsonl")
          if "loss" in r]
    lb = [(r["step"], r["loss"], r["bpp"], r["mse"], r["lr"]) for r in records(tmp_path / "b" / "log.jsonl")
          if "loss" in r]
    assert [r[0] for r in la] == list(range(1, 7)) and la == lb
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any("val" in r for r in records(tmp_path / "a" / "log.jsonl"))
    # the outputs are EVC checkpoints: the training checkpoint too (weights under "state_dict")
    for f in ("model.pt", "init.pt", "last.pt"):
        assert evc.load_model(tmp_path / "a" / f).enc_widths == (48, 48, 48, 48)
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["step"] == 6


class _NaNAtStep2(RDObjective):
    calls = 0

    def forward(self, x, rate):
        out = super().forward(x, rate)
        type(self).calls += 1
        if type(self).calls == 2:
            out["loss"] = out["loss"] * float("nan")
        return out


@needs_kodak
def test_nonfinite_guard_and_bf16(tmp_path):
    cfg = tiny("train.steps=3", "train.amp=bf16", "data.batch=1")
    torch.manual_seed(0)
    codec = evc.build_model("mini_EVC_SS")
    seen = []
    hooks = Hooks(after_step=lambda: seen.append({k: v.clone() for k, v in codec.state_dict().items()}))
    s = run_training(cfg, _NaNAtStep2(codec, cfg.train.lambdas), str(tmp_path), Dist(0, 1, torch.device("cpu")),
                     hooks=hooks, progress=False)
    assert s["skipped"] == 1
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # the skipped step 2 changed nothing
    logs = [r for r in records(tmp_path / "log.jsonl") if "loss" in r]
    assert [r["skipped"] for r in logs] == [0, 1, 1]
    assert all(torch.isfinite(v).all() for v in codec.state_dict().values())
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        run_training(tiny("train.amp=fp16"), RDObjective(codec, cfg.train.lambdas), str(tmp_path / "x"),
                     Dist(0, 1, torch.device("cpu")), progress=False)


@needs_kodak
def test_torchrun_two_processes_gloo(tmp_path):
    """`torchrun --nproc_per_node=2 -m maskdecay_examples.evc train` on CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "maskdecay_examples.evc",
           "train", "--config", TINY, "--out", str(tmp_path), "--no-progress", "--set", f"data.train={KODAK}",
           "--set", "val.images=0", "--set", "train.steps=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained mini_EVC_LL to step 3/3" in out.stdout
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 3
    assert [r["step"] for r in records(tmp_path / "log.jsonl") if "loss" in r] == [1, 2, 3]
    evc.load_model(tmp_path / "model.pt")
