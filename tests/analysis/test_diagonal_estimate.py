import math

import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import (
    DTYPE,
    DenseOperator,
    Recording,
    dominant,
    exchangeable,
    generator,
    jackknife,
    tanh_mlp,
    with_spectrum,
)
from torch_secorder.analysis.diagonal_estimate import METHODS


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    d = torch.tensor([3.0, -1.0, 2.5, 7.0], dtype=DTYPE)
    result = ts.hessian_diagonal_estimate(
        DenseOperator(torch.diag(d)), method="hutchinson", num_matvecs=3
    )
    torch.testing.assert_close(result.diagonal, d)
    torch.testing.assert_close(result.stderr, torch.zeros(4, dtype=DTYPE))
    assert result.num_matvecs == 3


@pytest.mark.parametrize("method", METHODS)
def test_entries_are_within_four_standard_errors(method):
    A = with_spectrum(dominant())
    result = ts.hessian_diagonal_estimate(DenseOperator(A), method=method, num_matvecs=60)
    error = (result.diagonal - A.diagonal()).abs()
    assert bool((result.stderr > 0).all())
    assert float((error <= 4 * result.stderr).double().mean()) > 0.99
    # about 95% within two standard errors, as for a normal estimate
    assert 0.85 < float((error <= 2 * result.stderr).double().mean()) <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_reported_stderr_matches_the_spread_over_seeds(method):
    A = with_spectrum(dominant(60))
    results = [
        ts.hessian_diagonal_estimate(
            DenseOperator(A), method=method, num_matvecs=30, generator=generator(s)
        )
        for s in range(80)
    ]
    estimates = torch.stack([r.diagonal for r in results])
    spread = estimates.std(dim=0)
    mean_stderr = torch.stack([r.stderr for r in results]).mean(dim=0)
    ratio = mean_stderr / spread
    assert 0.6 < float(ratio.median()) < 1.5
    # unbiased: the mean over seeds is within 4 of its standard errors of the truth
    bias = (estimates.mean(dim=0) - A.diagonal()).abs() / (spread / math.sqrt(len(results)))
    assert float((bias <= 4).double().mean()) > 0.98


@pytest.mark.parametrize("num_matvecs", [4, 10, 21])
@pytest.mark.parametrize("spectrum", ["dominant", "flat"])
def test_xdiag_is_the_mean_of_its_exchangeable_estimates_with_the_jackknifes_error(
    num_matvecs, spectrum, monkeypatch
):
    # the oracle from the definitions; slices of 3 rows test the slicing too
    from torch_secorder.analysis import _estimators

    monkeypatch.setattr(_estimators, "XDIAG_SLICE", 3 * (num_matvecs // 2))
    lam = dominant(20) if spectrum == "dominant" else torch.linspace(1.0, 2.0, 20, dtype=DTYPE)
    A = with_spectrum(lam)
    operator = Recording(A)
    result = ts.hessian_diagonal_estimate(operator, method="xdiag", num_matvecs=num_matvecs)
    Omega = operator.requests[0]
    torch.testing.assert_close(result.diagonal, exchangeable(A, Omega, diagonal=True).mean(-1))
    torch.testing.assert_close(result.stderr, jackknife(A, Omega, diagonal=True))


def test_xdiag_standard_errors_are_not_optimistic_on_a_flat_spectrum():
    # errors over seeds were 1.5 times the reported standard errors on this spectrum
    A = with_spectrum(torch.linspace(1.0, 2.0, 60, dtype=DTYPE))
    results = [
        ts.hessian_diagonal_estimate(
            DenseOperator(A), method="xdiag", num_matvecs=30, generator=generator(s)
        )
        for s in range(60)
    ]
    errors = torch.stack([r.diagonal for r in results]) - A.diagonal()
    stderr = torch.stack([r.stderr for r in results])
    assert float((errors.pow(2).mean(0).sqrt() / stderr.pow(2).mean(0).sqrt()).median()) < 1.0
    assert float(((errors / stderr).abs() <= 2).double().mean()) >= 0.95


def test_xdiag_beats_hutchinson_on_dominant_eigenvalues():
    A = with_spectrum(dominant())

    def error(method: str) -> float:
        errors = [
            float(
                (
                    ts.hessian_diagonal_estimate(
                        DenseOperator(A), method=method, num_matvecs=40, generator=generator(s)
                    ).diagonal
                    - A.diagonal()
                ).norm()
            )
            for s in range(10)
        ]
        return sum(errors) / len(errors)

    assert error("xdiag") < 0.5 * error("hutchinson")


def test_xdiag_is_exact_when_the_sketch_spans_the_space():
    A = with_spectrum(dominant(10))
    operator = DenseOperator(A)
    result = ts.hessian_diagonal_estimate(operator, method="xdiag", num_matvecs=25)
    torch.testing.assert_close(result.diagonal, A.diagonal())
    torch.testing.assert_close(result.stderr, torch.zeros(10, dtype=DTYPE))
    assert result.num_matvecs == operator.num_matvecs == 20


@pytest.mark.parametrize(
    ("method", "num_matvecs", "used", "widths"),
    [
        ("hutchinson", 37, 37, [37]),
        ("xdiag", 37, 36, [18, 18]),
    ],
)
def test_products_are_counted_and_batched(method, num_matvecs, used, widths):
    operator = DenseOperator(with_spectrum(dominant()))
    result = ts.hessian_diagonal_estimate(operator, method=method, num_matvecs=num_matvecs)
    assert result.num_matvecs == used == operator.num_matvecs
    assert operator.widths == widths


def test_hutchinson_chunks_keep_the_running_variance(monkeypatch):
    A = with_spectrum(dominant())
    whole = ts.hessian_diagonal_estimate(DenseOperator(A), method="hutchinson", num_matvecs=40)
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 8 * 200 * 7)
    operator = DenseOperator(A)
    chunked = ts.hessian_diagonal_estimate(operator, method="hutchinson", num_matvecs=40)
    assert operator.widths == [7] * 5 + [5]
    torch.testing.assert_close(chunked.diagonal, whole.diagonal)
    torch.testing.assert_close(chunked.stderr, whole.stderr)


def test_single_probe_has_undefined_stderr():
    operator = DenseOperator(with_spectrum(dominant()))
    hutchinson = ts.hessian_diagonal_estimate(operator, method="hutchinson", num_matvecs=1)
    xdiag = ts.hessian_diagonal_estimate(operator, method="xdiag", num_matvecs=3)
    assert bool(hutchinson.stderr.isnan().all())
    assert bool(xdiag.stderr.isnan().all())


def test_closure_form_returns_lists_like_params():
    W = torch.zeros(2, 3, dtype=DTYPE, requires_grad=True)
    b = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    A = with_spectrum(dominant(8))

    def func():
        x = torch.cat([W.reshape(-1), b])
        return 0.5 * x @ A @ x

    result = ts.hessian_diagonal_estimate(func, [W, b], num_matvecs=16)  # sketch spans all 8
    assert isinstance(result.diagonal, list)
    assert [t.shape for t in result.diagonal] == [(2, 3), (2,)]
    assert [t.shape for t in result.stderr] == [(2, 3), (2,)]
    torch.testing.assert_close(ts.flatten(result.diagonal), A.diagonal())


def test_model_form_with_groups():
    model, loss_fn, inputs, targets = tanh_mlp()
    named = dict(model.named_parameters())
    exact = ts.model_hessian_diagonal(model, loss_fn, inputs, targets)
    results = ts.model_hessian_diagonal_estimate(
        model,
        loss_fn,
        (inputs, targets),
        groups={"first": "0.*", "rest": ["2.*", "4.*"]},
        num_matvecs=100,
    )
    assert list(results) == ["first", "rest"]
    # the group blocks have 20 and 34 entries, so 50 sketch vectors span each: exact
    torch.testing.assert_close(results["first"].diagonal, exact[:2])
    torch.testing.assert_close(results["rest"].diagonal, exact[2:])
    assert [t.shape for t in results["rest"].diagonal] == [
        p.shape for p in list(named.values())[2:]
    ]
    whole = ts.model_hessian_diagonal_estimate(
        model, loss_fn, (inputs, targets), method="hutchinson", num_matvecs=50
    )
    assert len(whole.diagonal) == 6


def test_global_rng_is_untouched():
    operator = DenseOperator(with_spectrum(dominant()))
    state = torch.get_rng_state()
    for method in METHODS:
        ts.hessian_diagonal_estimate(operator, method=method, num_matvecs=10)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_operator_has_diagonal_zero(method):
    # every product zero (a parameter entering linearly): no 0/0 in XDiag
    result = ts.hessian_diagonal_estimate(
        DenseOperator(torch.zeros(40, 40, dtype=DTYPE)), method=method, num_matvecs=10
    )
    assert result.diagonal.abs().max() == 0
    assert result.stderr.abs().max() == 0


def test_a_linear_loss_has_diagonal_zero_by_default():
    w = torch.ones(200, dtype=DTYPE, requires_grad=True)
    result = ts.hessian_diagonal_estimate(lambda: 2 * w.sum(), [w])
    assert result.diagonal[0].abs().max() == 0
    assert result.stderr[0].abs().max() == 0
