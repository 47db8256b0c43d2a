"""CIFAR-10 as uint8 tensors, plus tiny tensor-side augmentation (shared by the quick-start and the ResNet example).

Two formats are read:

* the project's JPEG tars (``../shared/data/cifar10/``, see its ``SOURCE.md``): ``train.tar`` and ``test.tar``,
  whose members are ``<class>/<NNNN>.jpg``. These are JPEG (quality 75, 4:2:0) re-encodings of CIFAR-10, not the
  original pixels, so accuracies run a little below published CIFAR-10 numbers. Decoding all 60,000 JPEGs takes a
  few seconds; :func:`load_cifar10` keeps the decoded arrays as ``.npy`` files in a cache directory so reruns
  start at once.
* the official python release (``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html, or the
  ``cifar-10-batches-py/`` folder it unpacks to): the original pixels. Its batches are pickles; they are read with
  an unpickler that admits only the numpy array reconstruction they need, so a tampered file cannot run code.

Every :class:`Split` carries a ``note`` saying which of the two it came from, for the reports.

Usage::

    from maskdecay_examples.cifar import augment, batches, load_cifar10, to_float
    train, test = load_cifar10("../shared/data/cifar10", cache_dir="runs/demo/cache")
    for xb, yb in batches(train, 128, shuffle=True, generator=g):
        xb = augment(to_float(xb), generator=g)
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
"""Class names in label order (label = index)."""

# Per-channel statistics of the decoded JPEG train set (SOURCE.md), RGB in [0, 1].
MEAN: tuple[float, float, float] = (0.4913, 0.4821, 0.4465)
STD: tuple[float, float, float] = (0.2452, 0.2428, 0.2606)

DATA_NOTE = "CIFAR-10 as JPEG q75 (4:2:0) re-encodings, not the original pixels"
ORIGINAL_NOTE = "CIFAR-10 (the original pixels of the official python release)"
RELEASE_ARCHIVE = "cifar-10-python.tar.gz"
RELEASE_FOLDER = "cifar-10-batches-py"


@dataclass
class Split:
    """One split: ``x`` uint8 ``N x 3 x 32 x 32`` (RGB), ``y`` int64 ``N``; ``note`` says what the pixels are."""

    x: torch.Tensor
    y: torch.Tensor
    note: str = DATA_NOTE

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A class-mixed random subset of ``n`` samples (the whole split when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.x[idx], self.y[idx], self.note)


def decode_tar(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a ``<class>/<NNNN>.jpg`` tar into ``x`` uint8 (N, 32, 32, 3) and ``y`` int64 (N,)."""
    from PIL import Image  # imported lazily: only needed on a cache miss

    xs: list[np.ndarray] = []
    ys: list[int] = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            cls = m.name.split("/")[0]
            if cls not in CLASSES:
                raise ValueError(f"{path}: member {m.name!r} is not under one of the 10 class folders")
            f = tar.extractfile(m)
            assert f is not None
            with Image.open(io.BytesIO(f.read())) as im:
                xs.append(np.asarray(im.convert("RGB")))
            ys.append(CLASSES.index(cls))
    if not xs:
        raise ValueError(f"{path}: no .jpg members found; is this the CIFAR-10 JPEG tar?")
    x = np.stack(xs)
    if x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected 32x32 RGB images, got {x.shape[1:]}")
    return x, np.asarray(ys, dtype=np.int64)


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def load_split(tar_path: str | Path, cache_dir: str | Path | None = None) -> Split:
    """Load one tar as a :class:`Split`, using/writing an ``.npy`` cache in ``cache_dir``."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 tar not found: {tar_path}. Expected train.tar and test.tar from the project's "
            "shared data (../shared/data/cifar10/, see its SOURCE.md); pass --data DIR."
        )
    x = y = None
    if cache_dir is not None:
        cache = Path(cache_dir)
        stem = f"{tar_path.stem}-{_cache_key(tar_path)}"
        fx, fy = cache / f"{stem}-x.npy", cache / f"{stem}-y.npy"
        if fx.is_file() and fy.is_file():
            x, y = np.load(fx), np.load(fy)
            log.info("loaded %s from cache %s (%d images)", tar_path.name, fx, len(y))
    if x is None or y is None:
        t0 = time.perf_counter()
        x, y = decode_tar(tar_path)
        log.info("decoded %s: %d images in %.1f s", tar_path.name, len(y), time.perf_counter() - t0)
        if cache_dir is not None:
            cache.mkdir(parents=True, exist_ok=True)
            np.save(fx, x)
            np.save(fy, y)
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return Split(xt, torch.from_numpy(y))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the official batches (dicts of bytes, lists and numpy arrays) and refuses any other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"a CIFAR-10 batch may not reference {module}.{name}")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def find_release(path: str | Path) -> Path | None:
    """The official python release at ``path``: the archive or the folder itself, or either one inside ``path``."""
    path = Path(path)
    if path.is_file():
        return path if path.name.endswith((".tar.gz", ".tgz")) else None
    for folder in (path, path / RELEASE_FOLDER):
        if (folder / "test_batch").is_file():
            return folder
    return path / RELEASE_ARCHIVE if (path / RELEASE_ARCHIVE).is_file() else None


def load_release_split(release: str | Path, split: str) -> Split:
    """``split`` ("train": ``data_batch_1..5``, "test": ``test_batch``) of the official python release (the
    ``.tar.gz`` archive or the unpacked ``cifar-10-batches-py/`` folder), original pixels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    release = Path(release)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    blobs: dict[str, bytes] = {}
    try:
        if release.is_dir():
            blobs = {n: (release / n).read_bytes() for n in names}
        else:
            with tarfile.open(release, "r:*") as tar:
                for m in tar:
                    if m.isfile() and Path(m.name).name in names:
                        f = tar.extractfile(m)
                        assert f is not None
                        blobs[Path(m.name).name] = f.read()
        missing = [n for n in names if n not in blobs]
        if missing:
            raise ValueError(f"no {', '.join(missing)} in it")
        xs, ys = [], []
        for n in names:
            batch = _ArrayUnpickler(io.BytesIO(blobs[n]), encoding="bytes").load()
            data, labels = batch[b"data"], batch[b"labels"]
            xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(labels, dtype=np.int64))
    except (OSError, tarfile.TarError, zlib.error, pickle.UnpicklingError, ValueError, KeyError, TypeError,
            EOFError) as e:
        raise ValueError(f"{release}: not a readable CIFAR-10 python release ({type(e).__name__}: {e})") from None
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) != len(y) or (len(y) and not 0 <= y.min() <= y.max() < len(CLASSES)):
        raise ValueError(f"{release}: {split} images and labels do not match CIFAR-10's ({len(x)} images, "
                         f"{len(y)} labels)")
    log.info("read %s split of %s: %d images", split, release, len(y))
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), ORIGINAL_NOTE)


def load_cifar10(data_dir: str | Path, cache_dir: str | Path | None = None) -> tuple[Split, Split]:
    """Load ``(train, test)`` from ``data_dir/train.tar`` and ``data_dir/test.tar`` (the project's JPEG tars), or
    from the official python release: ``data_dir`` is ``cifar-10-python.tar.gz``, the ``cifar-10-batches-py/``
    folder, or a folder holding one of them."""
    data_dir = Path(data_dir)
    if (data_dir / "train.tar").is_file() or (data_dir / "test.tar").is_file():
        return load_split(data_dir / "train.tar", cache_dir), load_split(data_dir / "test.tar", cache_dir)
    release = find_release(data_dir)
    if release is not None:
        return load_release_split(release, "train"), load_release_split(release, "test")
    raise FileNotFoundError(
        f"CIFAR-10 not found at {data_dir}: expected a folder with train.tar and test.tar (the project's JPEG tars), "
        f"or the official python release ({RELEASE_ARCHIVE} or its {RELEASE_FOLDER}/ folder)")


def to_float(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 NCHW -> normalised float32 (optionally channels_last memory format)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    out = (x.float().div_(255) - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def augment(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding of ``pad`` px) and horizontal flip, per sample, on an NCHW batch.

    Works on uint8 or float batches; use it on the uint8 batch before :func:`to_float`
    (cheaper, and the padding is then black, as in the usual CIFAR recipe). Runs on ``x``'s device; a
    ``generator`` must live on that device too.
    """
    n, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=dev)
    rows = dy + torch.arange(h, device=dev)  # n x h
    cols = dx + torch.arange(w, device=dev)  # n x w
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    return padded[
        torch.arange(n, device=dev).view(n, 1, 1, 1),
        torch.arange(c, device=dev).view(1, c, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]


def batches(
    split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_uint8, y)`` minibatches of ``split``."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield split.x[idx], split.y[idx]
