"""A CIFAR-like tar of random JPEGs for the ResNet example's tests."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from maskdecay_examples.resnet.data import CLASSES


def cifar_tar(path: Path, n: int, seed: int) -> Path:
    """A CIFAR-like tar of ``n`` random 32x32 JPEGs under the 10 class folders."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            info = tarfile.TarInfo(f"{CLASSES[i % 10]}/{i:04d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return path
