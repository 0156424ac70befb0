"""The memory budget of the analyses: plans within ``max_bytes``, refuses before any product."""

import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import DenseOperator, dominant, with_spectrum
from torch_secorder.analysis import _memory


def _operator(n=200):
    return DenseOperator(with_spectrum(dominant(n)))


def test_the_default_budget_is_a_share_of_the_machine():
    assert _memory.default_max_bytes(torch.device("cpu")) > 2**28  # any machine running this


def test_hutch_plus_plus_keeps_a_smaller_sketch_within_the_budget():
    # rank 5: a sketch of 5 gives the trace exactly, a sketch of 4 does not
    lam = torch.cat([torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0]), torch.zeros(195)]).double()
    vector = 200 * 8

    def trace(vectors):  # a chunk of max(1, vectors // 16) columns, the rest kept
        operator = DenseOperator(with_spectrum(lam))
        result = ts.hessian_trace(
            operator, method="hutch++", num_matvecs=90, max_bytes=vectors * vector
        )
        assert result.num_matvecs == operator.num_matvecs == 90  # the rest went to probes
        return result

    fits = trace(13)  # 13 - 2 = 11 kept: a sketch of 5 with its factor
    torch.testing.assert_close(fits.value, lam.sum())
    assert float(fits.stderr) == pytest.approx(0, abs=1e-9)
    short = trace(11)  # 9 kept: a sketch of 4
    assert float(short.stderr) > 1e-3


def test_the_chunk_is_a_sixteenth_of_the_budget():
    operator = _operator()
    ts.hessian_trace(operator, method="hutchinson", num_matvecs=40, max_bytes=16 * 5 * 200 * 8)
    assert max(operator.widths) == 5


def test_lanczos_takes_a_smaller_basis_within_the_budget():
    lam = dominant(200)
    vector = 200 * 8
    operator = DenseOperator(with_spectrum(lam))
    # a chunk of 1 column, 16 vectors kept: a basis of 12 besides 2 Ritz vectors and a block
    result = ts.top_eigenvalues(operator, k=2, max_bytes=18 * vector)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, lam[:2], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda op, b: ts.hessian_trace(op, method="hutch++", max_bytes=b), "method='hutch\\+\\+'"),
        (lambda op, b: ts.hessian_trace(op, method="xtrace", max_bytes=b), "method='xtrace'"),
        (lambda op, b: ts.top_eigenvalues(op, max_bytes=b), "Lanczos"),
        (lambda op, b: ts.spectral_density(op, max_bytes=b), "a Lanczos basis of 100 steps"),
        (lambda op, b: ts.hessian_diagonal_estimate(op, max_bytes=b), "method='xdiag'"),
    ],
)
def test_too_small_a_budget_is_refused_before_any_product(call, what):
    operator = _operator()
    with pytest.raises(ValueError, match=rf"^\w+: {what} needs at least \d+ vectors of P=200 "):
        call(operator, 3 * 200 * 8)
    assert operator.num_matvecs == 0


@pytest.mark.parametrize(
    ("call", "kept", "what"),
    [
        (lambda op, b: ts.hessian_trace(op, method="hutchinson", max_bytes=b), 0, "hutchinson"),
        (lambda op, b: ts.hessian_trace(op, method="exact", max_bytes=b), 1, "exact"),
        (lambda op, b: ts.hessian_trace(op, num_matvecs=200, max_bytes=b), 1, "auto"),
        (lambda op, b: ts.hessian_diagonal_estimate(op, method="hutchinson", max_bytes=b), 2, "?"),
        (lambda op, b: ts.hessian_diagonal_estimate(op, num_matvecs=200, max_bytes=b), 1, "auto"),
        (lambda op, b: ts.top_eigenvalues(op, method="power", max_bytes=b), 5, "power"),
        (lambda op, b: ts.top_eigenvalues(op, k=3, method="power", max_bytes=b), 9, "power"),
    ],
)
@pytest.mark.parametrize("closure", [False, True])
def test_algorithms_that_only_chunk_refuse_a_budget_below_one_column(call, kept, what, closure):
    # they keep `kept` vectors besides a column and its product: one byte less is refused
    A = with_spectrum(dominant(200))
    x = torch.zeros(200, dtype=torch.float64, requires_grad=True)
    operator = ts.HessianOperator(lambda: 0.5 * x @ A @ x, [x]) if closure else DenseOperator(A)
    least = (kept + 2) * 200 * 8
    with pytest.raises(ValueError, match=r"needs (a chunk of products|at least \d+ vectors)"):
        call(operator, least - 1)
    assert operator.num_matvecs == 0
    call(operator, least)
    assert operator.num_matvecs > 0


def test_power_iteration_per_group_counts_its_vectors_at_the_operators_size():
    # ten groups of 110: each group's vectors at P = 1100 entries, as one search would keep
    torch.manual_seed(0)
    layers = [torch.nn.Linear(10, 10) for _ in range(10)]
    model = torch.nn.Sequential(*layers).double()
    data = (torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64))
    mse, vector = torch.nn.MSELoss(), 1100 * 8
    for groups in (None, "module"):
        with pytest.raises(ValueError, match="power iteration needs at least 5 vectors of P=1,100"):
            ts.model_top_eigenvalues(
                model, mse, data, groups=groups, method="power", max_bytes=7 * vector - 1
            )
        ts.model_top_eigenvalues(
            model, mse, data, groups=groups, method="power", max_bytes=7 * vector, tol=1.0
        )


def test_the_refusal_of_hutchinson_names_the_chunk():
    with pytest.raises(
        ValueError,
        match=r"^hessian_trace: method='hutchinson' needs a chunk of products \(vectors of "
        r"P=200 entries\), about 3\.1 KiB, more than max_bytes=3\.1 KiB;",
    ):
        ts.hessian_trace(_operator(), method="hutchinson", max_bytes=2 * 200 * 8 - 1)


@pytest.mark.parametrize("bad", [0, -5])
def test_max_bytes_must_be_positive(bad):
    with pytest.raises(
        ValueError, match=rf"^hessian_trace: max_bytes must be positive; got {bad}\."
    ):
        ts.hessian_trace(_operator(), max_bytes=bad)
    with pytest.raises(TypeError, match=r"^top_eigenvalues: max_bytes must be a number; got str\."):
        ts.top_eigenvalues(_operator(), max_bytes="1G")


def test_the_budget_is_the_calls_own():
    ts.hessian_trace(_operator(), method="hutch++", num_matvecs=30, max_bytes=2**30)
    assert _memory._BUDGET.get() is None  # nothing left set after the call


def test_exchangeable_estimators_warn_when_the_budget_leaves_products_unused():
    operator = _operator()
    with pytest.warns(
        RuntimeWarning,
        match=r"^hessian_trace: max_bytes=35\.9 KiB holds five blocks of 4 vectors of P=200 "
        r"entries, so method='xtrace' takes 8 of num_matvecs=100 products; raise max_bytes, or "
        r"take method='hutch\+\+'",
    ) as caught:  # (a chunk of 1 column, 21 vectors kept: five blocks of 4)
        result = ts.hessian_trace(operator, method="xtrace", max_bytes=23 * 200 * 8)
    assert result.num_matvecs == operator.num_matvecs == 8
    with pytest.warns(RuntimeWarning, match=r"method='xdiag' takes 8 .* method='hutchinson'"):
        ts.hessian_diagonal_estimate(_operator(), method="xdiag", max_bytes=23 * 200 * 8)
    assert caught[0].filename == __file__  # (the caller's line, not the library's)


def test_refusals_give_sizes_in_readable_units():
    with pytest.raises(ValueError, match=r"about 10\.9 KiB, more than max_bytes=4\.7 KiB"):
        ts.hessian_trace(_operator(), method="xtrace", max_bytes=3 * 200 * 8)


@pytest.mark.parametrize("k", [3, 5])
def test_blocks_wider_than_the_chunk_go_to_a_hessian_operator_in_pieces(k):
    # the budget's chunk holds 2 columns: a block of k goes in pieces, written into memory
    # of the block's own (contiguous columns, as each piece's out)
    A = with_spectrum(dominant(200))
    x = torch.zeros(200, dtype=torch.float64, requires_grad=True)
    operator = ts.HessianOperator(lambda: 0.5 * x @ A @ x, [x])
    budget = 48 * 200 * 8 - 1  # a chunk of 2 columns, 43 vectors kept
    with _memory.memory_budget("test", budget):
        assert _memory.max_columns(200, torch.float64, torch.device("cpu")) == 2
    result = ts.top_eigenvalues(operator, k=k, max_bytes=budget)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:k])
    estimate = ts.hessian_trace(operator, method="xtrace", num_matvecs=6, max_bytes=budget)
    assert estimate.num_matvecs == 6  # blocks of 3 columns


def test_the_model_forms_refuse_before_any_forward_pass():
    model = torch.nn.Sequential(torch.nn.Linear(20, 50), torch.nn.Tanh(), torch.nn.Linear(50, 3))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 20, generator=g), torch.randint(0, 3, (8,), generator=g))
    loss_fn = torch.nn.CrossEntropyLoss()
    for call in (ts.model_top_eigenvalues, ts.model_spectral_density, ts.model_hessian_trace):
        options = {"method": "hutch++"} if call is ts.model_hessian_trace else {}
        with pytest.raises(ValueError, match="needs at least"):
            call(model, loss_fn, data, max_bytes=10_000, **options)
    for method in ("exact", "auto", "hutchinson"):  # (a vector of P=1203 takes 4.7 KiB)
        with pytest.raises(ValueError, match=rf"method='{method}' needs"):
            ts.model_hessian_trace(model, loss_fn, data, method=method, max_bytes=9_000)
    assert forwards == []
