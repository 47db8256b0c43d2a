"""Shared by the conftests of tests/evc and tests/resnet.

pytest puts ``tests/`` on sys.path (because of tests/conftest.py); a folder such as ``tests/evc`` (no __init__.py)
would then be found first as an empty *namespace* package ``evc`` and shadow the editable install, whose finder runs
after the path-based one. :func:`use_example_package` drops such a namespace package and puts examples/ first; it is
the same source the editable install maps.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator

import torch

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples"))


def use_example_package(name: str) -> None:
    """Make ``import name`` resolve to ``examples/<name>``."""
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__file__", None) is None:
        for n in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[n]
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)


def one_thread() -> Iterator[None]:
    """Fixture body: run the test on one torch thread (tests that need more set their own), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
