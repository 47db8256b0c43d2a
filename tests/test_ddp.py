"""Masks and decay state stay identical on every rank under DDP (torchrun, 2 processes, gloo)."""
import os
import subprocess
import sys


def test_masks_identical_across_ranks() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "tests.ddp_worker"], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DDP-OK 6" in out.stdout
