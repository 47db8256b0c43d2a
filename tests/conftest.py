"""Every test starts from the same seed. ``tests`` is a package: test modules import the reference networks as
``tests.nets``."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, then restore the previous count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
