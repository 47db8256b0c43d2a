"""Make ``import evc`` resolve to the package in examples/evc.

pytest puts ``tests/`` on sys.path (because of tests/conftest.py); this folder, ``tests/evc`` (no __init__.py), would
then be found first as an empty *namespace* package ``evc`` and shadow the editable install, whose finder runs
after the path-based one. Putting examples/ first avoids that; it is the same source the editable install maps.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

_EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
_mod = sys.modules.get("evc")
if _mod is not None and getattr(_mod, "__file__", None) is None:  # a namespace package picked up from tests/
    for _name in [n for n in sys.modules if n == "evc" or n.startswith("evc.")]:
        del sys.modules[_name]
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)


@pytest.fixture(autouse=True)
def _one_thread():
    """EVC tests run single-threaded (exactness tests set their own thread counts)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
