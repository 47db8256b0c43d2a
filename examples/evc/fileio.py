"""Atomic file writes, shared by every part of the codec that writes files (checkpoints, streams, images, JSON)."""
from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write_bytes", "plain_open_mode"]


def plain_open_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``: readers see either
    the old file or the complete new one, and a failure leaves no partial file. The file ends with the permissions
    a plain ``open`` would give it (not the temporary file's 0600)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, plain_open_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
