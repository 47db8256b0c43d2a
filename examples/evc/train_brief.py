"""Brief training of a (small) EVC model, only to get realistic latent statistics for coder-overhead checks.

This is NOT the EVC training recipe (which is not published): straight-through rounding, loss
lambda*255^2*MSE + bpp with the 4 Scale-model lambdas, one lambda per q_scale anchor sampled per step, Adam,
random crops from a folder of images. Usage::

    python -m evc.train_brief --data ../shared/data/kodak --arch mini_EVC_SS --steps 300 --out runs/evc_brief.pt
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time

import torch

from .codec import load_image
from .models import SCALE_LAMBDAS, build_model, save_model

log = logging.getLogger(__name__)

__all__ = ["train", "main"]


def _crops(images: list[torch.Tensor], n: int, size: int, rng: random.Random) -> torch.Tensor:
    out = []
    for _ in range(n):
        x = images[rng.randrange(len(images))]
        h, w = x.shape[-2:]
        t, l = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
        c = x[..., t:t + size, l:l + size]
        if rng.random() < 0.5:
            c = c.flip(-1)
        out.append(c)
    return torch.cat(out, 0)


def train(data: str, arch: str = "mini_EVC_SS", steps: int = 300, batch: int = 8, size: int = 128,
          lr: float = 1e-3, seed: int = 0, progress: bool = True) -> torch.nn.Module:
    """Train ``arch`` for ``steps`` steps on random crops of the images in ``data``; returns the model."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    files = sorted(f for f in os.listdir(data) if f.lower().endswith(".png"))
    if not files:
        raise ValueError(f"{data}: no PNG images")
    images = [load_image(os.path.join(data, f))[0] for f in files]
    model = build_model(arch)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="train", file=sys.stderr)
    t0 = time.time()
    for step in range(steps):
        i = rng.randrange(len(SCALE_LAMBDAS))
        x = _crops(images, batch, size, rng)
        out = model(x, model.q_scale[i].view(1, 1, 1, 1), quant="ste")
        mse = torch.mean((out["x_hat"] - x) ** 2)
        bpp = (out["bits_y"] + out["bits_z"]).sum() / (batch * size * size)
        loss = SCALE_LAMBDAS[i] * 255.0 ** 2 * mse + bpp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.q_scale.clamp_(min=0.05)
        if bar is not None:
            bar.set_postfix_str(f"r{i} bpp={bpp.item():.3f} psnr={-10 * torch.log10(mse).item():.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    log.info("trained %s for %d steps in %.0f s", arch, steps, time.time() - t0)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m evc.train_brief", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--arch", default="mini_EVC_SS")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = train(args.data, args.arch, args.steps, args.batch, args.size, args.lr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_model(m, args.out)
    print(f"wrote {args.out}; q_scale anchors {[round(v, 4) for v in m.anchors()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
