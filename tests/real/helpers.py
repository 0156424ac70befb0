"""Helpers of the real-architecture tier: parameters, checked library calls, module groups.

Every library call of the tier goes through :func:`checked` (the no-side-effect snapshot after
the call, also when it raises) or :func:`reproducible` (the same, twice, bitwise equal).
"""

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.core.helpers import assert_unchanged, snapshot
from tests.real.models import ARCHS, MODES


def arch_params(names=ARCHS, modes=MODES) -> list:
    """``pytest.param((name, mode))`` for each architecture and mode."""
    return [pytest.param((name, mode), id=f"{name}-{mode}") for name in names for mode in modes]


def checked(model: nn.Module, fn: Callable[..., object], *args: object, **kwargs: object):
    """Call ``fn``; the model (and global RNG) must be as before, also when ``fn`` raises."""
    before = snapshot(model)
    try:
        return fn(*args, **kwargs)
    finally:
        assert_unchanged(before, model)


def reproducible(model: nn.Module, fn: Callable[..., object], *args: object, **kwargs: object):
    """:func:`checked` twice; the two results must be bitwise equal."""
    first = checked(model, fn, *args, **kwargs)
    second = checked(model, fn, *args, **kwargs)
    assert_identical(first, second)
    return first


def assert_identical(a: object, b: object) -> None:
    """Bitwise equality of results: tensors, lists, dicts and result dataclasses of them."""
    assert type(a) is type(b)
    if isinstance(a, Tensor):
        assert torch.equal(a, b), "two identical calls differ"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_identical(a[key], b[key])
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_identical(getattr(a, field.name), getattr(b, field.name))
    else:
        assert a == b


def own_modules(model, names):
    """Module name -> its own parameters among ``names`` (each parameter once), model order."""
    owned, seen = {}, set()
    for qualname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{qualname}.{pname}" if qualname else pname
            if full in names and id(p) not in seen:
                seen.add(id(p))
                owned.setdefault(qualname, []).append(full)
    return owned
