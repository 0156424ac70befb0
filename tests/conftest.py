"""Shared fixtures: the model zoo as a parametrized ``case`` fixture, and test hygiene.

Every test runs with the global RNG seeded to 0 and restored afterwards, and with the default
dtype restored afterwards, so no test can leak either into another.

Torch runs on one intra-op thread: the zoo's tensors are tiny, and on a small shared machine
several threads contend for the cores (a forward pass of the CNN case took 100x longer with two
threads on two busy cores than with one).
"""

import pytest
import torch

from tests.cases import CASES, Built, build

torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the differential fuzzer (``tests/core/test_structured_fuzz.py``)."""
    group = parser.getgroup("fuzz", "differential fuzzing of the structured diagonal")
    group.addoption("--fuzz-count", type=int, default=300, help="number of seeds (default 300)")
    group.addoption("--fuzz-seed", type=int, default=0, help="first seed (default 0)")


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Seed the global RNG for the test; restore it and the default dtype after."""
    rng = torch.get_rng_state()
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        torch.set_default_dtype(dtype)


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request: pytest.FixtureRequest) -> Built:
    """Each zoo case, built with its seed in float64."""
    return build(request.param)
