"""Process-wide memory settings for the large activations of a codec run."""
from __future__ import annotations

import ctypes
import os

__all__ = ["tune_allocator"]


def tune_allocator(keep_freed: bool = True) -> bool:
    """Process-wide memory settings for the large activations of a codec run; meant for the command line
    (``evc encode/decode/eval/bench``), which calls it before it creates any tensor.

    * ``keep_freed``: keep freed memory in the process heap (glibc: no ``mmap`` for large blocks, no trimming), so
      the activation tensors of consecutive layers reuse pages that are already mapped instead of page-faulting
      fresh ones. Faster, but the heap fragments and keeps its high-water mark, so the peak memory of large images
      grows by about a quarter. ``keep_freed=False`` (the CLI's ``--low-memory``) leaves glibc's defaults.
    * Ask PyTorch to back large CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, unless the
      variable is set already; PyTorch reads it at its first CPU allocation, so this part only takes effect when no
      tensor exists yet). Kernels that stream activations of hundreds of MB then miss the TLB far less.

    Returns whether the heap part was applied (False with ``keep_freed=False`` and where it does not apply: not
    glibc)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not keep_freed:
        return False

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0) == 1
    ok = mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    return ok
