"""CIFAR-10 loading: the official python release (archive or folder) next to the project's JPEG tars."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdecay_examples import cifar
from maskdecay_examples.resnet import data as resnet_data


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def _release(root: Path, archive: bool) -> tuple[Path, dict[str, dict]]:
    """A small copy of the official layout (5 train batches of 4 images, a test batch of 3), as the folder
    ``cifar-10-batches-py/`` or as ``cifar-10-python.tar.gz`` under ``root``."""
    batches = {f"data_batch_{i}": _batch(4, i) for i in range(1, 6)} | {"test_batch": _batch(3, 9)}
    folder = root / cifar.RELEASE_FOLDER
    folder.mkdir(parents=True)
    for name, b in batches.items():
        (folder / name).write_bytes(pickle.dumps(b, protocol=2))
    if not archive:
        return folder, batches
    with tarfile.open(root / cifar.RELEASE_ARCHIVE, "w:gz") as tar:
        tar.add(folder, arcname=cifar.RELEASE_FOLDER)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return root / cifar.RELEASE_ARCHIVE, batches


@pytest.mark.parametrize("archive", [False, True])
def test_official_release_is_read_with_its_pixel_layout(tmp_path, archive):
    where, batches = _release(tmp_path, archive)
    for location in (tmp_path, where):  # the folder holding the release, or the release itself
        train, test = cifar.load_cifar10(location)
        assert (len(train), len(test)) == (20, 3)
        assert train.note == test.note == cifar.ORIGINAL_NOTE
        first = batches["data_batch_1"]
        # a row is 1024 red, 1024 green, 1024 blue values, each a 32x32 image in row-major order
        assert train.x.dtype == torch.uint8 and train.x.shape == (20, 3, 32, 32)
        assert int(train.x[1, 2, 3, 4]) == int(first[b"data"][1, 2 * 1024 + 3 * 32 + 4])
        assert train.y[:4].tolist() == first[b"labels"]
        assert test.y.tolist() == batches["test_batch"][b"labels"]
        assert train.subset(5).note == cifar.ORIGINAL_NOTE


def test_resnet_example_reads_the_release_through_its_data_path(tmp_path):
    _release(tmp_path, archive=True)
    train_path, test_path = resnet_data.resolve(tmp_path, None, None)
    train = resnet_data.load_any(train_path, None, "train")
    test = resnet_data.load_any(test_path, None, "test")
    assert (len(train), len(test)) == (20, 3) and test.note == cifar.ORIGINAL_NOTE


def test_a_batch_that_references_other_code_is_refused(tmp_path):
    folder, _ = _release(tmp_path, archive=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="may not reference"):
        cifar.load_release_split(folder, "test")


def test_truncated_archive_and_missing_data_give_one_clear_error(tmp_path):
    where, _ = _release(tmp_path, archive=True)
    where.write_bytes(where.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 python release"):
        cifar.load_release_split(where, "train")
    with pytest.raises(FileNotFoundError, match="train.tar and test.tar .* official python release"):
        cifar.load_cifar10(tmp_path / "nothing")


def test_jpeg_tars_keep_their_note(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    for split in ("train", "test"):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            info = tarfile.TarInfo("cat/0000.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    train, test = cifar.load_cifar10(tmp_path)
    assert len(train) == len(test) == 1 and train.note == cifar.DATA_NOTE and int(train.y[0]) == 3
