"""Claims on the pieces of a study, so that several processes on one machine can share its output folder.

Each piece (the teacher, one run) has a lock file under ``out/state/``; a process works on a piece only while it holds
that file's ``flock``. The lock is released when the piece is done or when the process dies, however it dies, so a
killed worker never leaves a piece blocked. On systems without ``fcntl`` claims always succeed (one worker).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Hashable, Iterator, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: a single worker needs no locks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds between two looks at pieces that other workers hold
POLL_SECONDS = 30.0


class Busy(Exception):
    """Another process holds the piece."""


@contextmanager
def claim(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock file ``path`` while the block runs. Raises :class:`Busy` when another process holds it, unless
    ``wait``, which blocks until it is free. A process must not claim a path it already holds."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(path.stem) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def gather(jobs: dict[Hashable, Callable[[], T]], wait: bool, on_done: Callable[[dict], None] | None = None,
           poll: float | None = None, more: Callable[[dict], dict[Hashable, Callable[[], T]]] | None = None
           ) -> dict[Hashable, T]:
    """Run every job, in order, skipping those that raise :class:`Busy` and coming back to them.

    A pass that finished a job is followed at once by another (the held jobs may be free by then). After a pass that
    finished none, with ``wait`` the call sleeps ``poll`` seconds (default :data:`POLL_SECONDS`) and tries again;
    without it, :class:`Busy` is raised.
    ``on_done(results)`` is called after each finished job. ``more(results)``, called after each finished job too,
    returns jobs that the results so far make possible (e.g. runs chosen from a ranking); those not yet listed are
    added after the others and run from the next pass on. Results come back in the order of the jobs.
    """
    jobs = dict(jobs)
    results: dict[Hashable, T] = {}
    while True:
        held, progressed = [], False
        for key, job in list(jobs.items()):
            if key in results:
                continue
            try:
                results[key] = job()
            except Busy as e:
                held.append(str(e))
                continue
            progressed = True
            if on_done is not None:
                on_done({k: results[k] for k in jobs if k in results})
            if more is not None:
                new = {k: j for k, j in more(dict(results)).items() if k not in jobs}
                jobs.update(new)
                progressed |= bool(new)
        if not held and all(k in results for k in jobs):
            return {k: results[k] for k in jobs}
        if progressed:
            continue
        if not wait:
            raise Busy(", ".join(held))
        log.info("waiting for pieces other workers hold: %s", ", ".join(held))
        time.sleep(POLL_SECONDS if poll is None else poll)
