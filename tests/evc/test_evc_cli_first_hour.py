"""The ``evc`` command as a new user meets it: file permissions, refused arguments, an eval folder with a bad image,
train runs that fail early, bdrate on curves that do not overlap, hints for a missing checkpoint, model names, the
data location of the demos and the default synthesis of the decoder."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from maskdecay_examples import evc
from maskdecay_examples.evc.cli.imageio import to_uint8
from maskdecay_examples.evc.cli.main import main as cli
from maskdecay_examples.evc.fileio import atomic_write_bytes

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
KODAK = os.path.join(ROOT, "..", "shared", "data", "kodak")
TINY = os.path.join(ROOT, "examples", "evc", "configs", "tiny.yaml")


def _png(path, h=32, w=48, seed=0):
    g = np.random.default_rng(seed)
    a = (g.random((h, w, 3)) * 60 + 100).astype(np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- 3.1 permissions ------------------------------------------------------------------------------------------
def test_written_files_get_plain_open_permissions(tmp_path, umask_022):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"x")
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    src = tmp_path / "in.png"
    _png(src)
    out, rec = tmp_path / "a.evc", tmp_path / "rec.png"
    assert cli(["encode", str(src), str(out), "--model", "random:mini_EVC_SS"]) == 0
    assert cli(["decode", str(out), str(rec), "--model", "random:mini_EVC_SS"]) == 0
    ck = tmp_path / "m.pt"
    evc.save_model(evc.build_model("mini_EVC_SS"), ck)
    for f in (out, rec, ck):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- 3.2 arguments accepted silently and wrongly --------------------------------------------------------------
def test_threads_zero_is_refused(tmp_path, capsys):
    src = tmp_path / "in.png"
    _png(src)
    assert cli(["encode", str(src), str(tmp_path / "a.evc"), "--model", "random:mini_EVC_SS", "--threads", "0"]) == 1
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_enc_id_on_a_single_encoder_model_is_refused(tmp_path, capsys):
    src = tmp_path / "in.png"
    _png(src)
    assert cli(["encode", str(src), str(tmp_path / "a.evc"), "--model", "random:mini_EVC_SS", "--enc-id", "1"]) == 1
    assert "scalable models only" in capsys.readouterr().err
    assert not (tmp_path / "a.evc").exists()


def test_eval_limit_zero_is_refused(tmp_path, capsys):
    _png(tmp_path / "a.png")
    assert cli(["eval", "--dataset", str(tmp_path), "--model", "random:mini_EVC_SS", "--json",
                str(tmp_path / "r.json"), "--limit", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_eval_skips_an_unreadable_image_and_still_writes_json(tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    _png(data / "a.png")
    (data / "b.png").write_bytes(b"not a png at all")
    _png(data / "c.png", seed=1)
    j = tmp_path / "r.json"
    assert cli(["eval", "--dataset", str(data), "--model", "random:mini_EVC_SS", "--json", str(j), "--rates",
                "4"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "b.png" in ln]
    assert lines and all(ln.startswith("evc: warning: skipped") for ln in lines)
    doc = json.loads(j.read_text())
    assert doc["meta"]["images"] == 2 and [s["image"] for s in doc["meta"]["skipped"]] == ["b.png"]
    assert doc["meta"]["synthesis"] == "float"  # the default


def test_train_with_a_missing_data_folder_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", "--config", TINY, "--out", str(out), "--no-progress", "--set",
                f"data.train={tmp_path / 'nope'}"]) == 1
    assert "no such image folder" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(not os.path.isdir(KODAK), reason="Kodak not available")
def test_corrupt_resume_checkpoint_is_one_clear_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert cli(["train", "--config", TINY, "--out", str(out), "--no-progress", "--resume", "--set",
                f"data.train={KODAK}", "--set", f"val.data={KODAK}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("evc: error:") and "cannot resume" in err
    assert "internal error" not in err


def test_bdrate_on_curves_that_do_not_overlap_fails_clearly(tmp_path, capsys):
    def curve(name, psnr):
        return {"name": name, "results": {"bpp": [0.1, 0.2, 0.4, 0.8], "psnr-rgb": psnr}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(curve("low", [20.0, 21.0, 22.0, 23.0])))
    b.write_text(json.dumps(curve("high", [30.0, 31.0, 32.0, 33.0])))
    with _NoWarnings():
        rc = cli(["bdrate", str(a), str(b)])
    err = capsys.readouterr().err
    assert rc == 1 and "do not overlap" in err and "nan" not in err and err.count("\n") == 1


class _NoWarnings:
    """Fails when a warning is issued inside the block."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self._rec = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not self._rec, [str(w.message) for w in self._rec]


# --- 3.3 names and hints --------------------------------------------------------------------------------------
def test_missing_checkpoint_hints_at_random_and_the_official_weights(tmp_path, capsys):
    src = tmp_path / "in.png"
    _png(src)
    assert cli(["encode", str(src), str(tmp_path / "a.evc"), "--model", "EVC_SS"]) == 1
    err = capsys.readouterr().err
    assert "random:EVC_SS" in err and "download.py" in err and err.count("\n") == 1


def test_mini_models_have_their_name(tmp_path):
    m = evc.build_model("mini_EVC_SS")
    assert m.name == "mini_EVC_SS"
    p = tmp_path / "m.pt"
    evc.save_model(m, p)
    assert evc.load_model(p).name == "mini_EVC_SS"
    sd = torch.load(p, weights_only=True)["state_dict"]  # a bare state dict: the name comes from the shapes
    assert evc.load_model(sd).name == "mini_EVC_SS"


# --- 3.4 the data location ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["demo", "evc-demo"])
def test_make_demos_take_data_from_a_variable(target):
    # -o: the install stamp counts as up to date, so no install runs, whatever the checkout's file times
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", target, "DATA=/nonexistent/data"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "/nonexistent/data" in r.stderr and "DATA" in r.stderr


# --- 3.5 the decoder's default synthesis ----------------------------------------------------------------------
def test_decode_defaults_to_float_synthesis_and_exact_is_an_option(tmp_path):
    torch.manual_seed(0)
    m = evc.build_model("mini_EVC_SS").eval()
    ck = tmp_path / "m.pt"
    evc.save_model(m, ck)
    src = tmp_path / "in.png"
    _png(src, 64, 80)
    s, fast, exact, old = (tmp_path / n for n in ("a.evc", "f.png", "e.png", "o.png"))
    assert cli(["encode", str(src), str(s), "--model", str(ck)]) == 0
    assert cli(["decode", str(s), str(fast), "--model", str(ck), "--reference"]) == 0
    assert cli(["decode", str(s), str(exact), "--model", str(ck), "--exact-synthesis"]) == 0
    assert cli(["decode", str(s), str(old), "--model", str(ck), "--fast-synthesis", "--reference"]) == 0
    x, _, _ = evc.load_image(src)
    rec = evc.reconstruct(m, x, evc.select_rate(m))["x_hat"]
    want_exact = to_uint8(rec)
    want_float = to_uint8(evc.decompress(m, s.read_bytes(), exact_synthesis=False).x_hat)
    assert np.array_equal(np.asarray(Image.open(exact)), want_exact)
    assert np.array_equal(np.asarray(Image.open(fast)), want_float)
    assert np.array_equal(np.asarray(Image.open(old)), want_float)
