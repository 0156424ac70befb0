import math

import pytest
import torch
from torch import nn

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
from torch_secorder.analysis._estimators import orthonormal_rows
from torch_secorder.analysis.trace import METHODS

STOCHASTIC = ["hutchinson", "hutch++", "xtrace"]


def quadratic(d: torch.Tensor):
    """A loss with the diagonal Hessian diag(d) in one parameter x."""
    x = torch.zeros(len(d), dtype=DTYPE, requires_grad=True)
    return (lambda: 0.5 * (d * x**2).sum()), [x]


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    d = torch.tensor([3.0, -1.0, 2.5, 7.0], dtype=DTYPE)
    result = ts.hessian_trace(DenseOperator(torch.diag(d)), method="hutchinson", num_matvecs=5)
    torch.testing.assert_close(result.value, d.sum())
    torch.testing.assert_close(result.stderr, torch.zeros((), dtype=DTYPE))
    assert result.num_matvecs == 5


@pytest.mark.parametrize("method", STOCHASTIC)
@pytest.mark.parametrize("seed", range(3))
def test_estimate_is_within_four_standard_errors(method, seed):
    A = with_spectrum(dominant(), seed=seed)
    result = ts.hessian_trace(
        DenseOperator(A), method=method, num_matvecs=60, generator=generator(seed)
    )
    assert result.stderr > 0
    assert abs(result.value - A.trace()) <= 4 * result.stderr


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketching_beats_hutchinson_on_dominant_eigenvalues(method):
    A = with_spectrum(dominant())
    truth = A.trace()

    def rmse(name: str) -> float:
        errors = [
            float(
                ts.hessian_trace(
                    DenseOperator(A), method=name, num_matvecs=30, generator=generator(s)
                ).value
                - truth
            )
            for s in range(40)
        ]
        return math.sqrt(sum(e * e for e in errors) / len(errors))

    assert rmse(method) < 0.25 * rmse("hutchinson")


@pytest.mark.parametrize("num_matvecs", [4, 10, 21])
@pytest.mark.parametrize("spectrum", ["dominant", "flat"])
def test_xtrace_is_the_mean_of_its_exchangeable_estimates_with_the_jackknifes_error(
    num_matvecs, spectrum
):
    # the oracle from the definitions: a dense projector for every test vector left out
    lam = dominant(30) if spectrum == "dominant" else torch.linspace(1.0, 2.0, 30, dtype=DTYPE)
    A = with_spectrum(lam)
    operator = Recording(A)
    result = ts.hessian_trace(operator, method="xtrace", num_matvecs=num_matvecs)
    Omega = operator.requests[0]
    assert Omega.shape == (30, num_matvecs // 2)
    torch.testing.assert_close(result.value, exchangeable(A, Omega).mean())
    torch.testing.assert_close(result.stderr, jackknife(A, Omega))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_jackknife_keeps_nearly_parallel_directions_of_an_ill_conditioned_sketch(dtype):
    # 7 eigenvalues above a bulk of 1e-3 (float32) or 1e-6: 8 test vectors give a sketch
    # whose left-out directions are nearly parallel, yet well determined
    bulk = 1e-3 if dtype == torch.float32 else 1e-6
    lam = torch.cat([torch.linspace(1.0, 5.0, 7), torch.full((33,), bulk)]).to(DTYPE)
    A = with_spectrum(lam)
    for method in ("xtrace", "xdiag"):
        operator = Recording(A.to(dtype))
        if method == "xtrace":
            stderr = ts.hessian_trace(operator, method=method, num_matvecs=16).stderr
        else:
            stderr = ts.hessian_diagonal_estimate(operator, method=method, num_matvecs=16).stderr
        Omega = operator.requests[0].to(DTYPE)
        expected = jackknife(A, Omega, diagonal=method == "xdiag")
        torch.testing.assert_close(stderr.to(DTYPE), expected, rtol=0.05, atol=0)  # (rounding)


def test_xtrace_standard_errors_are_not_optimistic_on_a_flat_spectrum():
    # the exchangeable estimates share their sketches: their spread understated the error
    # (errors over seeds 1.5 to 1.7 times the reported standard errors on this spectrum)
    A = with_spectrum(torch.linspace(1.0, 2.0, 100, dtype=DTYPE))
    results = [
        ts.hessian_trace(DenseOperator(A), method="xtrace", num_matvecs=30, generator=generator(s))
        for s in range(100)
    ]
    z = torch.stack([(r.value - A.trace()) / r.stderr for r in results])
    assert float(z.std()) < 1.0
    assert float((z.abs() <= 2).double().mean()) >= 0.95


@pytest.mark.parametrize("method", STOCHASTIC)
def test_reported_stderr_matches_the_spread_over_seeds(method):
    A = with_spectrum(dominant())
    results = [
        ts.hessian_trace(DenseOperator(A), method=method, num_matvecs=40, generator=generator(s))
        for s in range(60)
    ]
    values = torch.stack([r.value for r in results])
    spread = float(values.std())
    mean_stderr = float(torch.stack([r.stderr for r in results]).mean())
    assert 0.5 * spread < mean_stderr < 2.0 * spread
    # unbiased: the mean over seeds is within 4 standard errors of the mean
    assert abs(float(values.mean() - A.trace())) < 4 * spread / math.sqrt(len(results))


@pytest.mark.parametrize(
    ("method", "num_matvecs", "used"),
    [
        ("hutchinson", 37, 37),
        ("hutch++", 37, 37),  # 12 sketch, 12 basis, 13 probes
        ("hutch++", 3, 3),
        ("xtrace", 37, 36),  # 18 test vectors and their 18-column basis
        ("xtrace", 2, 2),
    ],
)
def test_products_are_counted_and_within_budget(method, num_matvecs, used):
    operator = DenseOperator(with_spectrum(dominant()))
    result = ts.hessian_trace(operator, method=method, num_matvecs=num_matvecs)
    assert result.num_matvecs == used == operator.num_matvecs


def test_probes_of_a_stage_run_as_one_product():
    operator = DenseOperator(with_spectrum(dominant()))
    ts.hessian_trace(operator, method="hutchinson", num_matvecs=40)
    assert operator.widths == [40]
    operator = DenseOperator(with_spectrum(dominant()))
    ts.hessian_trace(operator, method="hutch++", num_matvecs=40)
    assert operator.widths == [13, 27]  # the sketch, then its basis with the probes together


def test_hutchinson_chunks_probes_when_memory_is_short(monkeypatch):
    A = with_spectrum(dominant())
    whole = ts.hessian_trace(DenseOperator(A), method="hutchinson", num_matvecs=40)
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 8 * 200 * 16)
    operator = DenseOperator(A)
    result = ts.hessian_trace(operator, method="hutchinson", num_matvecs=40)
    assert operator.widths == [16, 16, 8]
    assert result.num_matvecs == 40
    # the probes are drawn one after another: chunking does not change them
    torch.testing.assert_close(result.value, whole.value)
    torch.testing.assert_close(result.stderr, whole.stderr)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketch_spanning_the_space_is_exact(method):
    A = with_spectrum(torch.linspace(-2.0, 5.0, 6, dtype=DTYPE))
    result = ts.hessian_trace(DenseOperator(A), method=method, num_matvecs=30)
    torch.testing.assert_close(result.value, A.trace())
    assert float(result.stderr) == 0.0
    assert result.num_matvecs == 12  # 6 sketch vectors and a 6-column basis


def test_xtrace_handles_a_low_rank_operator():
    lam = torch.zeros(50, dtype=DTYPE)
    lam[:3] = torch.tensor([4.0, 2.0, -1.0], dtype=DTYPE)
    A = with_spectrum(lam)
    result = ts.hessian_trace(DenseOperator(A), method="xtrace", num_matvecs=20)
    torch.testing.assert_close(result.value, A.trace())
    assert float(result.stderr) < 1e-10


@pytest.mark.parametrize("method", STOCHASTIC)
def test_a_zero_operator_has_trace_zero(method):
    # a parameter entering linearly: zero curvature, every product zero (no 0/0 in XTrace)
    result = ts.hessian_trace(DenseOperator(torch.zeros(40, 40, dtype=DTYPE)), method=method)
    assert float(result.value) == 0.0
    assert float(result.stderr) == 0.0


class UnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_a_zero_group_has_trace_zero_beside_others():
    model = UnusedHead().to(DTYPE)
    x = torch.randn(6, 3, generator=generator(0), dtype=DTYPE)
    traces = ts.model_hessian_trace(
        model, nn.MSELoss(), (x, x[:, :2]), groups="module", method="xtrace", num_matvecs=8
    )
    assert float(traces["unused"].value) == float(traces["unused"].stderr) == 0.0
    assert all(
        math.isfinite(float(t.value)) and float(t.value) != 0
        for t in traces.values()
        if t is not traces["unused"]
    )


def test_exact_operator_form_uses_unit_vectors():
    A = with_spectrum(dominant(30))
    operator = DenseOperator(A)
    result = ts.hessian_trace(operator, method="exact")
    torch.testing.assert_close(result.value, A.trace())
    assert float(result.stderr) == 0.0
    assert result.num_matvecs == operator.num_matvecs == 30


def test_single_hutchinson_probe_has_undefined_stderr():
    result = ts.hessian_trace(
        DenseOperator(with_spectrum(dominant())), method="hutchinson", num_matvecs=1
    )
    assert math.isnan(float(result.stderr))


@pytest.mark.parametrize("method", METHODS)
def test_closure_form_matches_the_operator_form(method):
    d = torch.tensor([1.0, 2.0, -3.0, 4.0, 0.5], dtype=DTYPE)
    func, params = quadratic(d)
    closure = ts.hessian_trace(func, params, method=method, num_matvecs=4)
    operator = ts.hessian_trace(DenseOperator(torch.diag(d)), method=method, num_matvecs=4)
    torch.testing.assert_close(closure.value, operator.value)
    torch.testing.assert_close(closure.stderr, operator.stderr)
    assert closure.num_matvecs == operator.num_matvecs


def test_mlp_trace_matches_the_dense_hessian():
    model, loss_fn, inputs, targets = tanh_mlp()
    params = list(model.parameters())
    H = ts.hessian_matrix(lambda: loss_fn(model(inputs), targets), params)
    size = H.shape[0]
    for method in METHODS:  # with 3 P products the sketches span the space: exact
        result = ts.model_hessian_trace(
            model, loss_fn, (inputs, targets), method=method, num_matvecs=3 * size
        )
        if method == "hutchinson":
            assert abs(result.value - H.trace()) <= 4 * result.stderr
        else:
            torch.testing.assert_close(result.value, H.trace())


def test_model_groups_estimate_each_diagonal_block():
    model, loss_fn, inputs, targets = tanh_mlp()
    named = dict(model.named_parameters())
    H = ts.hessian_matrix(lambda: loss_fn(model(inputs), targets), list(named.values()))
    results = ts.model_hessian_trace(
        model, loss_fn, (inputs, targets), groups="parameter", method="exact"
    )
    assert list(results) == list(named)
    diagonal = H.diagonal().split([p.numel() for p in named.values()])
    for (name, result), block in zip(results.items(), diagonal):
        torch.testing.assert_close(result.value, block.sum(), msg=name)
        assert result.num_matvecs <= named[name].numel()
    # the linear layers are read off their outputs: fewer products than elements in all
    assert 0 < sum(r.num_matvecs for r in results.values()) < H.shape[0]


def test_defaults_are_reproducible_and_generators_independent():
    operator = DenseOperator(with_spectrum(dominant()))
    first = ts.hessian_trace(operator)
    second = ts.hessian_trace(operator)
    torch.testing.assert_close(first.value, second.value)
    other = ts.hessian_trace(operator, generator=generator(123))
    assert float(other.value) != float(first.value)


def test_global_rng_is_untouched():
    operator = DenseOperator(with_spectrum(dominant()))
    state = torch.get_rng_state()
    for method in METHODS:
        ts.hessian_trace(operator, method=method, num_matvecs=10)
    assert torch.equal(torch.get_rng_state(), state)


def test_float32_operator_keeps_dtype():
    A = with_spectrum(dominant()).float()
    result = ts.hessian_trace(DenseOperator(A), num_matvecs=30)
    assert result.value.dtype == result.stderr.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [8, 60])  # the sketch spanning the space, and not
@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_half_precision_operators_take_sketches(method, size, dtype):
    # no QR in half precision (LAPACK, cuSOLVER): the sketch is factorised in float32
    A = with_spectrum(dominant(size)) / 10
    operator = DenseOperator(A.to(dtype))
    result = ts.hessian_trace(operator, method=method, num_matvecs=30, generator=generator(0))
    assert result.value.dtype == result.stderr.dtype == dtype
    exact = float(A.to(dtype).double().trace())
    if size == 8:  # exact to the operator's rounding
        assert abs(float(result.value) - exact) <= 2e-2 * abs(exact)
    else:
        assert abs(float(result.value) - exact) <= 4 * float(result.stderr) + 2e-2 * abs(exact)
    diagonal = ts.hessian_diagonal_estimate(operator, method="xdiag", num_matvecs=30)
    assert diagonal.diagonal.dtype == dtype
    assert bool(diagonal.diagonal.isfinite().all())


def test_closure_form_under_no_grad_leaves_rng_and_grads_alone():
    model, loss_fn, inputs, targets = tanh_mlp()
    params = list(model.parameters())
    state = torch.get_rng_state()
    with torch.no_grad():
        result = ts.hessian_trace(lambda: loss_fn(model(inputs), targets), params, num_matvecs=9)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in params)
    assert result.num_matvecs == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("condition", [1e1, 1e5, 1e12])
def test_orthonormal_rows_span_the_sketch_and_are_orthonormal(dtype, condition, monkeypatch):
    # Cholesky QR twice up to about 1e7 in float32, Householder beyond (and for 1e12)
    g = torch.Generator().manual_seed(0)
    s, n = 12, 5000
    U, _ = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))
    singular = torch.logspace(0, -math.log10(condition), s, dtype=torch.float64)
    S = ((U * singular) @ V).T.contiguous().to(dtype)
    if condition < 1e7:  # no Householder QR on this path

        def householder(*args, **kwargs):
            raise AssertionError("Householder QR called")

        monkeypatch.setattr(torch.linalg, "qr", householder)
    Q = orthonormal_rows(S.clone()).double()
    eps = torch.finfo(dtype).eps
    assert (Q @ Q.T - torch.eye(s, dtype=torch.float64)).abs().max() < 100 * eps
    S = S.double()
    assert (S - (S @ Q.T) @ Q).norm() <= 100 * eps * S.norm()


def test_orthonormal_rows_of_a_rank_deficient_sketch():
    g = torch.Generator().manual_seed(1)
    S = torch.randn(4, 300, generator=g, dtype=torch.float64)
    S = torch.cat([S, S[:2] + S[2:]])  # rank 4 of 6 rows: Householder
    Q = orthonormal_rows(S.clone())
    torch.testing.assert_close(Q @ Q.T, torch.eye(6, dtype=torch.float64))
    assert (S - (S @ Q.T) @ Q).norm() <= 1e-12 * S.norm()
