"""``import resnet`` resolves to examples/resnet (see tests/example_packages.py); ResNet tests run on one thread."""
from __future__ import annotations

import pytest

from example_packages import one_thread, use_example_package

use_example_package("resnet")

_single_thread = pytest.fixture(autouse=True)(one_thread)
