"""Training data for ``evc train``/``evc decay``: random crops from any folder of images.

Sampling is *step-keyed*: the batch of optimizer step ``t`` on DDP rank ``r`` (which images, where the crops sit,
flips, the rate index) is drawn from a generator seeded with ``(seed, t, r)`` only. The data stream is thus a pure
function of the step counter, which the checkpoint holds: a resumed run sees exactly the batches it would have seen,
whatever the number of DataLoader workers.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTS", "list_images", "step_generator", "RandomCropBatches", "StepSampler", "load_val_images"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def list_images(root: str) -> list[str]:
    """Every image file under ``root`` (recursively), sorted; ``ValueError`` if there is none."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: no such image folder")
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    if not out:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTS)})")
    return sorted(out)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator seeded from ``(seed, step, rank)`` (hashed, so nearby keys give unrelated streams)."""
    h = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")  # greyscale, palette, CMYK, RGBA -> RGB (alpha dropped)


def _fit(im: Image.Image, side: int) -> Image.Image:
    """Upscale so that the shorter side is at least ``side`` (bicubic); larger images are returned as they are."""
    w, h = im.size
    if min(w, h) >= side:
        return im
    s = side / min(w, h)
    return im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BICUBIC)


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class RandomCropBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``t`` is the batch of step ``t``: ``(x [B,3,crop,crop] in [0,1], rate index)``.

    Args:
        root: image folder (searched recursively; any format PIL reads).
        crop: square crop side.
        batch: images per batch (per rank).
        seed: run seed.
        rank: DDP rank (each rank draws its own batches).
        small: ``"upscale"`` images whose shorter side is below ``crop`` (bicubic), or ``"skip"`` them.
        hflip: random horizontal flips.
        rates: number of rate anchors the rate index is drawn from (uniformly).
    """

    def __init__(self, root: str, crop: int, batch: int, seed: int, rank: int = 0, small: str = "upscale",
                 hflip: bool = True, rates: int = 4) -> None:
        self.files = list_images(root)
        if small == "skip":
            keep = []
            for f in self.files:
                with Image.open(f) as im:
                    if min(im.size) >= crop:
                        keep.append(f)
            if not keep:
                raise ValueError(f"{root}: no image is at least {crop}x{crop} (data.small=skip)")
            if len(keep) < len(self.files):
                log.info("%s: skipping %d images smaller than %d px", root, len(self.files) - len(keep), crop)
            self.files = keep
        self.crop, self.batch, self.seed, self.rank = crop, batch, seed, rank
        self.hflip, self.rates = hflip, rates

    def __len__(self) -> int:
        return 1 << 62  # indexed by step; the sampler decides which steps are drawn

    def __getitem__(self, step: int) -> tuple[torch.Tensor, int]:
        g = step_generator(self.seed, int(step), self.rank)
        rate = int(torch.randint(self.rates, (1,), generator=g))
        crops = []
        for _ in range(self.batch):
            idx = int(torch.randint(len(self.files), (1,), generator=g))
            im = _fit(_open_rgb(self.files[idx]), self.crop)
            w, h = im.size
            left = int(torch.randint(w - self.crop + 1, (1,), generator=g))
            top = int(torch.randint(h - self.crop + 1, (1,), generator=g))
            flip = self.hflip and bool(torch.rand((), generator=g) < 0.5)
            c = im.crop((left, top, left + self.crop, top + self.crop))
            if flip:
                c = c.transpose(Image.FLIP_LEFT_RIGHT)
            crops.append(_to_tensor(c))
        return torch.stack(crops), rate


class StepSampler(torch.utils.data.Sampler[int]):
    """Yields the step numbers ``start, start+1, ..., stop-1``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def load_val_images(root: str, n: int, crop: int) -> torch.Tensor:
    """The first ``n`` images of ``root`` (sorted by name), centre-cropped to ``crop``x``crop``: [n,3,crop,crop]."""
    files = list_images(root)[:n]
    out = []
    for f in files:
        im = _fit(_open_rgb(f), crop)
        w, h = im.size
        left, top = (w - crop) // 2, (h - crop) // 2
        out.append(_to_tensor(im.crop((left, top, left + crop, top + crop))))
    return torch.stack(out)
