"""CIFAR-10 data for the ResNet example: uint8 tensors decoded once, augmented on tensors.

The tar reader, the ``.npy`` cache, the tensor augmentation (random 32x32 crop of the 4-px zero-padded image + random
horizontal flip) and the normalisation live in :mod:`maskdecay_examples.cifar` (one implementation for both CIFAR
examples); this module adds what the ResNet example needs on top: image *folders* as well as tars, and a batch stream
that runs across training phases.

Accepted data locations (``data.path`` in the config):

* a folder holding ``train.tar`` and ``test.tar`` (the project's ``../shared/data/cifar10``: JPEG q75 re-encodings of
  CIFAR-10, see its SOURCE.md), or ``train/`` and ``test/`` sub-folders;
* the official python release: ``cifar-10-python.tar.gz``, its ``cifar-10-batches-py/`` folder, or a folder holding
  either (the original pixels);
* or explicit ``data.train`` / ``data.test`` paths, each a tar or a folder of ``<class>/<image>`` files
  (``.jpg``/``.jpeg``/``.png``, 32x32 RGB), with the 10 CIFAR-10 class names as folder names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..cifar import (CLASSES, DATA_NOTE, Split, augment, batches, find_release, load_release_split, load_split,
                     to_float)

__all__ = ["CLASSES", "DATA_NOTE", "Split", "augment", "batches", "to_float", "load_folder", "load_any", "resolve",
           "BatchStream"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_folder(path: str | Path) -> "Split":
    """Decode a ``<class>/<image>`` folder (CIFAR-10 class names) into a :class:`Split`."""
    from PIL import Image

    path = Path(path)
    files = sorted(f for f in path.glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images found (expected <class>/<name>.jpg|png with CIFAR-10 class folders)")
    xs, ys = [], []
    for f in files:
        if f.parent.name not in CLASSES:
            raise ValueError(f"{f}: folder {f.parent.name!r} is not one of the CIFAR-10 classes {list(CLASSES)}")
        with Image.open(f) as im:
            xs.append(np.asarray(im.convert("RGB")))
        ys.append(CLASSES.index(f.parent.name))
    x = np.stack(xs)
    if x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected 32x32 RGB images, got {x.shape[1:]}")
    return Split(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.asarray(ys, dtype=np.int64)),
                 f"CIFAR-10 from the image folder {path}")


def load_any(path: str | Path, cache_dir: str | Path | None, split: str) -> "Split":
    """One split from a tar (cached as ``.npy`` in ``cache_dir``), an image folder, or the official python release
    (its ``split``: "train" or "test")."""
    path = Path(path)
    release = find_release(path)
    if release is not None:
        return load_release_split(release, split)
    if path.is_dir():
        return load_folder(path)
    if path.is_file():
        return load_split(path, cache_dir)
    raise FileNotFoundError(f"data not found: {path} (a tar of <class>/<image> members or such a folder)")


def resolve(root: str | Path | None, train: str | Path | None, test: str | Path | None) -> tuple[Path, Path]:
    """The train and test locations from a data root and/or explicit paths (explicit paths win)."""
    paths = []
    for explicit, stem in ((train, "train"), (test, "test")):
        if explicit is not None:
            paths.append(Path(explicit))
            continue
        if root is None:
            raise ValueError(f"data: give data.path (a folder with {stem}.tar or {stem}/) or data.{stem}")
        base = Path(root)
        release = find_release(base)
        if release is not None and not (base / f"{stem}.tar").exists():
            paths.append(release)
            continue
        candidates = [base / f"{stem}.tar", base / stem]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"{base}: neither {stem}.tar nor {stem}/ found, nor the official python release "
                                    "(cifar-10-python.tar.gz or cifar-10-batches-py/)")
        paths.append(found)
    return paths[0], paths[1]


class BatchStream:
    """Endless augmented training batches (reshuffled every epoch), as normalised channels_last float tensors.

    One stream can feed several phases (decay, then fine-tune) so that every method sees the same batches. The
    batches are made on the CPU (same numbers on any device) and moved to ``device``.
    """

    def __init__(self, split: "Split", batch_size: int, seed: int, device: str = "cpu",
                 channels_last: bool = True) -> None:
        if batch_size > len(split):
            raise ValueError(f"batch size {batch_size} is larger than the training set ({len(split)} images)")
        self.split = split
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            xb, yb = next(self._it)
        except StopIteration:
            self._it = batches(self.split, self.batch_size, shuffle=True, generator=self.gen, drop_last=True)
            xb, yb = next(self._it)
        xb = to_float(augment(xb, generator=self.gen), channels_last=self.channels_last)
        return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

    def __iter__(self) -> "BatchStream":
        return self
