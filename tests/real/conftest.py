"""Fixtures of the real-architecture tier: each architecture in each mode, and the data kinds."""

import pytest

from tests.real.helpers import arch_params
from tests.real.models import Arch, build


@pytest.fixture(params=arch_params())
def arch(request: pytest.FixtureRequest) -> Arch:
    """Each architecture in train and eval mode (built once, shared by all tests)."""
    return build(*request.param)


@pytest.fixture(params=["batch", "batches"])
def kind(request: pytest.FixtureRequest) -> str:
    """One ``(inputs, targets)`` batch, or a data set of several batches."""
    return request.param
