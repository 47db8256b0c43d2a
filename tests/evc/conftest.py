"""EVC tests run on one torch thread (tests that need more set their own)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Every EVC test on one thread (the fixture of tests/conftest.py)."""
