"""One model, one batch, one Hessian: every function describes the same matrix.

A model with dropout in train mode draws its masks in every forward pass; each function that
runs the model on batch ``b`` does so under the same RNG seed, so all of them see the same
masks, and their results agree with each other exactly (up to rounding).
"""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts

F64 = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(6, 6),
        nn.GELU(),
        nn.Dropout(0.3),
        nn.Linear(6, 3),
    ).to(F64)


def _batch(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


LOSS = nn.CrossEntropyLoss()


@pytest.fixture
def setup():
    model = _model()
    x, y = _batch()
    H = ts.model_hessian_matrix(model, LOSS, x, y)
    return model, x, y, H


def test_dropout_masks_differ_between_forward_passes(setup):
    # otherwise the tests below could not fail: the masks do change the Hessian
    model, x, y, H = setup
    with torch.random.fork_rng():
        torch.manual_seed(123)
        other = ts.hessian_matrix(lambda: LOSS(model(x), y), list(model.parameters()))
    assert not torch.allclose(H, other)


def test_exact_trace_equals_sum_of_diagonal_equals_matrix_trace(setup):
    model, x, y, H = setup
    diagonal = ts.model_hessian_diagonal(model, LOSS, x, y)
    trace = ts.model_hessian_trace(model, LOSS, (x, y), method="exact")
    assert_close(torch.cat([d.reshape(-1) for d in diagonal]), H.diagonal())
    assert_close(trace.value, H.trace())


def test_products_and_operator_match_the_matrix(setup):
    model, x, y, H = setup
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    assert_close(ts.model_hvp(model, LOSS, x, y, v), H @ v)
    operator = ts.HessianOperator.from_model(model, LOSS, (x, y))
    assert_close(operator @ torch.eye(H.shape[0], dtype=F64), H)


def test_eigenvalues_and_density_describe_the_matrix(setup):
    model, x, y, H = setup
    top = ts.model_top_eigenvalues(model, LOSS, (x, y), k=2, tol=1e-8)
    assert_close(top.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2])
    density = ts.model_spectral_density(model, LOSS, (x, y), num_matvecs=H.shape[0])
    assert density.nodes.max() == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_operator_seed_moves_all_model_forms_together():
    model = _model()
    x, y = _batch()
    base = ts.model_hessian_trace(model, LOSS, (x, y), method="exact")
    moved = ts.model_hessian_trace(model, LOSS, (x, y), method="exact", seed=7)
    operator = ts.HessianOperator.from_model(model, LOSS, (x, y), seed=7)
    eye = torch.eye(operator.shape[0], dtype=F64)
    assert not torch.allclose(base.value, moved.value)
    assert_close(moved.value, (operator @ eye).trace())
