"""``import resnet`` must find examples/resnet, not this folder: pytest puts ``tests/`` on sys.path, where
``tests/resnet`` (no ``__init__.py``) would be picked up as an empty namespace package before the editable install's
finder runs. Also: the ResNet tests run on one thread (the machine is shared)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_examples = str(Path(__file__).resolve().parents[2] / "examples")
if getattr(sys.modules.get("resnet"), "__file__", "") is None:
    for name in [n for n in list(sys.modules) if n == "resnet" or n.startswith("resnet.")]:
        sys.modules.pop(name)
if _examples not in sys.path:
    sys.path.insert(0, _examples)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
