"""``import evc`` resolves to examples/evc (see tests/example_packages.py); EVC tests run on one thread."""
from __future__ import annotations

import pytest

from example_packages import one_thread, use_example_package

use_example_package("evc")

_one_thread = pytest.fixture(autouse=True)(one_thread)
