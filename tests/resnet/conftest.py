"""ResNet tests run on one torch thread."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Every ResNet test on one thread (the fixture of tests/conftest.py)."""
