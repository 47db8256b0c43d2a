"""Make the reference networks in tests/nets.py importable as ``nets``; keep tests single-threaded and seeded."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
