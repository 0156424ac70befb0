"""Core model forms on the real architectures, in train and eval mode, against the oracle.

``model_hvp`` (all parameters, and a subset with a flat vector), ``model_hessian_diagonal`` and
``model_hessian_matrix`` of a parameter subset on one batch (seed 0), and
``HessianOperator.from_model`` on one batch and on a data set (batch ``b`` under seed ``b``),
of the subset and of all parameters. Every call is followed by the no-side-effect snapshot;
the functions that batch or chunk are called twice and must agree bitwise.
"""

import torch
from torch.testing import assert_close

import torch_secorder as ts
from tests.core.helpers import assert_unchanged, snapshot
from tests.real import oracle
from tests.real.helpers import checked, reproducible


def _subset(arch):
    named = dict(arch.model.named_parameters())
    return [named[n] for n in arch.subset]


def _flat_random(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_model_hvp_all_parameters(arch):
    x, y = arch.batch
    v = oracle.random_like(arch.model, None, seed=1)
    got = checked(arch.model, ts.model_hvp, arch.model, arch.loss_fn, x, y, v)
    expected = oracle.hvp(arch.model, arch.loss_fn, [arch.batch], v)
    assert type(got) is list
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_model_hvp_subset_flat(arch):
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    x, y = arch.batch
    v = _flat_random(H.shape[0], seed=2)
    got = checked(arch.model, ts.model_hvp, arch.model, arch.loss_fn, x, y, v, params=arch.subset)
    assert got.shape == v.shape
    assert_close(got, H @ v)


def test_model_hessian_diagonal(arch):
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    x, y = arch.batch
    got = reproducible(
        arch.model, ts.model_hessian_diagonal, arch.model, arch.loss_fn, x, y, params=arch.subset
    )
    assert type(got) is list
    assert [d.shape for d in got] == [p.shape for p in _subset(arch)]
    assert_close(oracle.flat(got), H.diagonal())


def test_model_hessian_matrix(arch):
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    x, y = arch.batch
    got = reproducible(
        arch.model, ts.model_hessian_matrix, arch.model, arch.loss_fn, x, y, params=arch.subset
    )
    assert_close(got, H)


def test_operator_subset(arch, kind):
    H = oracle.arch_hessian(arch.name, arch.mode, kind)
    model = arch.model
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    operator = checked(
        model,
        ts.HessianOperator.from_model,
        model,
        arch.loss_fn,
        arch.library_data(kind),
        params=arch.subset,
    )
    assert operator.shape == H.shape
    first = checked(model, operator.matmat, eye)
    assert_close(first, H)
    assert operator.num_samples == sum(x.shape[0] for x, _ in arch.data(kind))
    assert torch.equal(checked(model, operator.matmat, eye), first)
    v = _flat_random(H.shape[0], seed=3)
    product = checked(model, operator.matvec, v)
    assert_close(product, H @ v)
    before = snapshot(model)
    operator.release()
    assert_unchanged(before, model)
    assert torch.equal(checked(model, operator.matvec, v), product)  # the rebuilt graph
    assert operator.num_matvecs == 2 * H.shape[0] + 2


def test_operator_all_parameters(arch, kind):
    v = oracle.random_like(arch.model, None, seed=5)
    expected = oracle.flat(oracle.hvp(arch.model, arch.loss_fn, arch.data(kind), v))
    operator = checked(
        arch.model, ts.HessianOperator.from_model, arch.model, arch.loss_fn, arch.library_data(kind)
    )
    assert operator.shape == (expected.numel(), expected.numel())
    V = torch.stack([oracle.flat(v), -2 * oracle.flat(v)], dim=1)
    got = checked(arch.model, operator.matmat, V)
    assert_close(got[:, 0], expected)
    assert_close(got[:, 1], -2 * expected)
