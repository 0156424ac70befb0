import warnings

import pytest
import torch
from torch import nn

import torch_secorder as ts
from tests.analysis.operators import (
    DTYPE,
    DenseOperator,
    clustered,
    dominant,
    generator,
    indefinite,
    tanh_mlp,
    with_spectrum,
)

SPECTRA = {"dominant": dominant(), "clustered": clustered(), "indefinite": indefinite()}


def expected(eigenvalues: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "largest":
        return eigenvalues.sort(descending=True).values[:k]
    if which == "smallest":
        return eigenvalues.sort().values[:k]
    return eigenvalues[eigenvalues.abs().argsort(descending=True)][:k]


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("k", [1, 4])
def test_lanczos_finds_the_wanted_eigenpairs(spectrum, which, k):
    lam = SPECTRA[spectrum]
    A = with_spectrum(lam)
    operator = DenseOperator(A)
    result = ts.top_eigenvalues(operator, k=k, which=which, tol=1e-10)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, expected(lam, k, which))
    X = result.eigenvectors
    assert X.shape == (len(lam), k)
    torch.testing.assert_close(X.T @ X, torch.eye(k, dtype=DTYPE))
    true_residuals = (A @ X - X * result.eigenvalues).norm(dim=0)
    torch.testing.assert_close(result.residuals, true_residuals, rtol=1e-3, atol=1e-9)
    assert bool((true_residuals <= 1e-10 * result.eigenvalues.abs()).all())
    assert result.num_matvecs == operator.num_matvecs


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_defaults_give_the_top_eigenvalues_to_1e_3(spectrum):
    lam = SPECTRA[spectrum]
    result = ts.top_eigenvalues(DenseOperator(with_spectrum(lam, seed=3)), k=3)
    truth = expected(lam, 3, "largest")
    assert result.converged
    assert bool(((result.eigenvalues - truth).abs() <= 1e-3 * truth.abs()).all())
    relative = result.residuals / result.eigenvalues.abs()
    assert bool((relative <= 1e-4).all())


def test_lanczos_with_p_products_recovers_every_eigenvalue():
    lam = torch.randn(30, generator=generator(1), dtype=DTYPE)
    operator = DenseOperator(with_spectrum(lam))
    result = ts.top_eigenvalues(operator, k=30, max_matvecs=30)
    assert result.converged
    assert result.num_matvecs == 30
    torch.testing.assert_close(result.eigenvalues, lam.sort(descending=True).values)


def test_repeated_eigenvalues_and_exhausted_krylov_spaces():
    lam = torch.tensor([5.0] * 10 + [1.0] * 10, dtype=DTYPE)  # a Krylov space of dimension 2
    result = ts.top_eigenvalues(DenseOperator(with_spectrum(lam)), k=3, which="smallest")
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([1.0, 1.0, 1.0], dtype=DTYPE))
    X = result.eigenvectors
    torch.testing.assert_close(X.T @ X, torch.eye(3, dtype=DTYPE))


def test_zero_operator():
    result = ts.top_eigenvalues(DenseOperator(torch.zeros(8, 8, dtype=DTYPE)), k=2)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.zeros(2, dtype=DTYPE))


def test_too_small_a_budget_warns_and_reports_not_converged():
    operator = DenseOperator(with_spectrum(clustered()))
    with pytest.warns(
        RuntimeWarning,
        match=r"top_eigenvalues: the eigenpairs did not reach tol=0\.0001 \(relative residual\) "
        r"within max_matvecs=6; the results are the best found \(converged=False\)\. Raise "
        r"max_matvecs or tol\.",
    ):
        result = ts.top_eigenvalues(operator, k=2, max_matvecs=6)
    assert not result.converged
    assert result.num_matvecs == operator.num_matvecs == 6
    assert result.eigenvalues.shape == (2,)


def test_groups_that_did_not_converge_are_named():
    model, loss_fn, inputs, targets = tanh_mlp()
    with pytest.warns(RuntimeWarning) as record:
        results = ts.model_top_eigenvalues(
            model, loss_fn, (inputs, targets), groups="module", k=2, max_matvecs=3
        )
    missing = [name for name, result in results.items() if not result.converged]
    assert missing
    listed = ", ".join(repr(name) for name in missing)
    assert str(record[0].message).startswith(
        f"model_top_eigenvalues: group{'s' if len(missing) > 1 else ''} {listed} did not reach"
    )
    assert record[0].filename == __file__


def test_warning_points_at_the_caller():
    with pytest.warns(RuntimeWarning) as record:
        ts.top_eigenvalues(DenseOperator(with_spectrum(clustered())), max_matvecs=3)
    assert record[0].filename == __file__


POSITIVE_DOMINANT = torch.cat(
    [torch.tensor([100.0, 60.0, -30.0, -20.0], dtype=DTYPE), torch.linspace(-5, 5, 96, dtype=DTYPE)]
)


@pytest.mark.parametrize(
    ("which", "lam"),
    [
        ("magnitude", indefinite()),  # plain PyHessian power iteration
        ("largest", indefinite()),  # the dominant eigenvalue is negative: shift by +50
        ("smallest", POSITIVE_DOMINANT),  # the dominant eigenvalue is positive: shift by -100
        ("largest", POSITIVE_DOMINANT),  # the wanted end dominates: no shift
    ],
)
def test_power_iteration_with_shift_and_deflation(which, lam):
    truth = expected(lam, 2, which)
    operator = DenseOperator(with_spectrum(lam))
    result = ts.top_eigenvalues(
        operator, k=2, which=which, method="power", tol=1e-10, max_matvecs=20000
    )
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, truth, rtol=1e-6, atol=1e-6)  # slow tail
    assert result.num_matvecs == operator.num_matvecs


def test_power_default_budget_is_100_per_run():
    operator = DenseOperator(with_spectrum(clustered()))
    with pytest.warns(
        RuntimeWarning,
        match=r"relative eigenvalue change\) within "
        r"max_matvecs=300",
    ):
        result = ts.top_eigenvalues(operator, k=2, method="power", tol=1e-14)
    assert result.num_matvecs <= 300


def test_power_iteration_stays_unshifted_while_the_wanted_end_dominates():
    # The two largest eigenvalues are also the two of largest magnitude: "largest" runs the
    # same unshifted iterations as "magnitude" (PyHessian), drawing the same start vectors.
    operator = DenseOperator(with_spectrum(POSITIVE_DOMINANT))
    runs = [
        ts.top_eigenvalues(
            operator, k=2, which=which, method="power", tol=1e-8, generator=generator(5)
        )
        for which in ("largest", "magnitude")
    ]
    torch.testing.assert_close(runs[0].eigenvalues, runs[1].eigenvalues)
    assert runs[0].num_matvecs == runs[1].num_matvecs
    assert runs[0].converged
    torch.testing.assert_close(
        runs[0].eigenvalues, expected(POSITIVE_DOMINANT, 2, "largest"), rtol=1e-6, atol=1e-6
    )  # slow tail: 60/100 per step, as in the parametrized test above


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_power_iteration_shifts_when_a_later_run_finds_the_other_end(which):
    # The first run finds the wanted dominant 100 (or -100); the second, unshifted, then
    # converges to the unwanted -60 (or 60), is dropped, and a shifted third run finds 40.
    lam = torch.cat(
        [
            torch.tensor([100.0, -60.0, 40.0], dtype=DTYPE),
            torch.linspace(-5.0, 5.0, 57, dtype=DTYPE),
        ]
    )
    lam = lam if which == "largest" else -lam
    operator = DenseOperator(with_spectrum(lam))
    result = ts.top_eigenvalues(
        operator, k=2, which=which, method="power", tol=1e-12, max_matvecs=20000
    )
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, expected(lam, 2, which), rtol=1e-6, atol=1e-6)
    assert result.num_matvecs == operator.num_matvecs


def test_power_default_budget_gives_100_per_pair_when_no_run_is_dropped():
    operator = DenseOperator(with_spectrum(clustered()))
    with pytest.warns(RuntimeWarning, match=r"within max_matvecs=300"):
        result = ts.top_eigenvalues(operator, k=2, method="power", tol=1e-14)
    assert result.num_matvecs == 200  # the reserve run for an unwanted eigenvalue is unused


class _Float32Products(DenseOperator):
    """Products rounded to float32: explicit residuals cannot go below about 1e-7."""

    def matmat(self, V):
        return super().matmat(V).float().double()


def test_a_residual_floor_of_the_products_is_named_in_the_warning():
    operator = _Float32Products(with_spectrum(clustered()))
    with pytest.warns(RuntimeWarning) as record:
        result = ts.top_eigenvalues(operator, k=2, tol=1e-9, max_matvecs=400)
    message = str(record[0].message)
    assert message.startswith("top_eigenvalues: the eigenpairs did not reach tol=1e-09")
    assert "stopped improving, limited by the rounding of the Hessian-vector products" in message
    assert not result.converged
    assert result.num_matvecs <= 400
    assert bool((result.residuals > 1e-9 * result.eigenvalues.abs()).any())


def test_lanczos_needs_far_fewer_products_than_power_iteration():
    lam = dominant()
    truth = expected(lam, 3, "largest")
    operator = DenseOperator(with_spectrum(lam))
    lanczos = ts.top_eigenvalues(operator, k=3)
    power = ts.top_eigenvalues(operator, k=3, method="power", tol=1e-7, max_matvecs=5000)
    for result in (lanczos, power):
        assert bool(((result.eigenvalues - truth).abs() <= 1e-3 * truth).all())
    assert 3 * lanczos.num_matvecs <= power.num_matvecs


def test_closure_form_returns_eigenvectors_like_params():
    W = torch.zeros(2, 3, dtype=DTYPE, requires_grad=True)
    b = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    A = with_spectrum(dominant(8))

    def func():
        x = torch.cat([W.reshape(-1), b])
        return 0.5 * x @ A @ x

    result = ts.top_eigenvalues(func, [W, b], k=3, tol=1e-10)
    assert isinstance(result.eigenvectors, list)
    assert [t.shape for t in result.eigenvectors] == [(3, 2, 3), (3, 2)]
    flat = ts.flatten(result.eigenvectors, batched=True).T
    torch.testing.assert_close(A @ flat, flat * result.eigenvalues)


def test_mlp_eigenvalues_match_the_dense_hessian():
    model, loss_fn, inputs, targets = tanh_mlp()
    params = list(model.parameters())
    func = lambda: loss_fn(model(inputs), targets)  # noqa: E731
    eigenvalues = torch.linalg.eigvalsh(ts.hessian_matrix(func, params))
    for which in ("largest", "smallest", "magnitude"):
        result = ts.top_eigenvalues(func, params, k=3, which=which, tol=1e-9)
        torch.testing.assert_close(result.eigenvalues, expected(eigenvalues, 3, which))
        model_result = ts.model_top_eigenvalues(
            model, loss_fn, (inputs, targets), k=3, which=which, tol=1e-9
        )
        torch.testing.assert_close(model_result.eigenvalues, result.eigenvalues)
        a = ts.flatten(model_result.eigenvectors, batched=True)
        b = ts.flatten(result.eigenvectors, batched=True)
        # the same unit eigenvectors up to sign (rounding may flip the sign Lanczos settles on)
        torch.testing.assert_close((a * b).sum(dim=1).abs(), torch.ones(3, dtype=DTYPE))


def test_model_groups_analyse_each_diagonal_block():
    model, loss_fn, inputs, targets = tanh_mlp()
    named = dict(model.named_parameters())
    H = ts.hessian_matrix(lambda: loss_fn(model(inputs), targets), list(named.values()))
    results = ts.model_top_eigenvalues(
        model, loss_fn, (inputs, targets), groups="module", k=2, tol=1e-9
    )
    assert list(results) == ["0", "2", "4"]
    offset = 0
    for name, result in results.items():
        layer = [named[f"{name}.weight"], named[f"{name}.bias"]]
        size = sum(p.numel() for p in layer)
        block = H[offset : offset + size, offset : offset + size]
        offset += size
        truth = torch.linalg.eigvalsh(block).flip(0)[:2]
        torch.testing.assert_close(result.eigenvalues, truth)
        assert [t.shape for t in result.eigenvectors] == [(2, *p.shape) for p in layer]


def test_model_form_leaves_no_trace():
    model, loss_fn, inputs, targets = tanh_mlp()
    model.eval()
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    ts.model_top_eigenvalues(model, loss_fn, (inputs, targets), k=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training
    for p, saved in zip(model.parameters(), before):
        assert torch.equal(p, saved)
        assert p.grad is None


def test_reproducible_by_default_and_generator_changes_the_start():
    operator = DenseOperator(with_spectrum(dominant()))
    first = ts.top_eigenvalues(operator, k=2)
    second = ts.top_eigenvalues(operator, k=2)
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    third = ts.top_eigenvalues(operator, k=2, generator=generator(5))
    assert not torch.equal(first.eigenvectors, third.eigenvectors)


def test_float32_operator():
    A = with_spectrum(dominant()).float()
    result = ts.top_eigenvalues(DenseOperator(A), k=2)
    assert result.converged
    assert result.eigenvalues.dtype == result.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(result.eigenvalues, torch.tensor([100.0, 60.0]))


def test_dropout_in_train_mode_gives_one_fixed_symmetric_operator():
    g = generator(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(6, 2)
    ).to(DTYPE)
    inputs = torch.randn(10, 3, generator=g, dtype=DTYPE)
    targets = torch.randn(10, 2, generator=g, dtype=DTYPE)
    data = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    loss_fn = torch.nn.MSELoss()
    operator = ts.HessianOperator.from_model(model, loss_fn, data)
    H = operator.matmat(torch.eye(operator.shape[0], dtype=DTYPE))
    torch.testing.assert_close(H, H.T)
    state = torch.get_rng_state()
    result = ts.model_top_eigenvalues(model, loss_fn, data, k=3, which="magnitude", tol=1e-9)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    eigenvalues = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(result.eigenvalues, expected(eigenvalues, 3, "magnitude"))


def test_exhausted_krylov_space_continues_and_finds_every_copy():
    # Under MSE the last layer's block is I_2 (x) C: each eigenvalue twice, Krylov spaces of
    # dimension 5 out of 10.
    model, loss_fn, inputs, targets = tanh_mlp()
    block = ts.model_hessian_matrix(model, loss_fn, inputs, targets, params="4.*")
    eigenvalues = torch.linalg.eigvalsh(block)
    for which in ("largest", "smallest"):
        result = ts.model_top_eigenvalues(
            model, loss_fn, (inputs, targets), params="4.*", k=4, which=which, tol=1e-10
        )
        torch.testing.assert_close(result.eigenvalues, expected(eigenvalues, 4, which))


def test_last_layer_block_of_mse_reports_every_copy():
    # with d outputs, the last layer's block is I_d (x) B: every eigenvalue d times
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 2),
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss()
    result = ts.model_top_eigenvalues(model, loss_fn, (x, y), params="4.*", k=3)
    block = ts.hessian_matrix(lambda: loss_fn(model(x), y), model[4].parameters())
    expected = torch.linalg.eigvalsh(block).flip(0)[:3]
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues, expected, rtol=1e-6, atol=0
    )  # tol=1e-4 residuals
    assert torch.isclose(result.eigenvalues[0], result.eigenvalues[1], rtol=1e-6)


def _slowly_separated_top(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix whose top eigenvalue 2 converges slowly, one isolated at -1; its eigenvectors."""
    spectrum = torch.cat(
        [1 + torch.linspace(1, 0, n - 1, dtype=DTYPE) ** 8, torch.tensor([-1.0], dtype=DTYPE)]
    )
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator(seed), dtype=DTYPE))
    A = (Q * spectrum) @ Q.T
    return (A + A.T) / 2, Q


def test_lanczos_starts_from_the_loss_gradient_where_the_operator_keeps_it():
    # one Hessian, its loss gradient at x = 0 along the top eigenvector or zero
    A, Q = _slowly_separated_top(300, seed=0)
    x = torch.zeros(300, dtype=DTYPE, requires_grad=True)

    def quadratic():
        return 0.5 * x @ (A @ x)

    def along_top():
        return quadratic() + Q[:, 0] @ x

    for which in ("largest", "magnitude"):
        cold = ts.top_eigenvalues(quadratic, [x], which=which)
        warm = ts.top_eigenvalues(along_top, [x], which=which)
        assert cold.converged
        assert warm.converged
        torch.testing.assert_close(warm.eigenvalues, torch.tensor([2.0], dtype=DTYPE))
        assert warm.num_matvecs <= cold.num_matvecs - 4  # 15 against 21
    with ts.HessianOperator(along_top, [x]) as operator:  # an operator given: its gradient too
        assert ts.top_eigenvalues(operator).num_matvecs == warm.num_matvecs
    # the smallest end, and power iteration, start at random whatever the gradient
    for options in ({"which": "smallest"}, {"method": "power"}):
        cold = ts.top_eigenvalues(quadratic, [x], **options)
        warm = ts.top_eigenvalues(along_top, [x], **options)
        assert torch.equal(cold.eigenvalues, warm.eigenvalues)
        assert cold.num_matvecs == warm.num_matvecs


class _TwoBlocks(nn.Module):
    """A loss ``0.5 z^T A z + u^T z`` of its parameters ``z = (a, b)``, ``A`` block diagonal."""

    def __init__(self, blocks: list[torch.Tensor], u: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(blocks[0].shape[0], dtype=DTYPE))
        self.b = nn.Parameter(torch.zeros(blocks[1].shape[0], dtype=DTYPE))
        self.A, self.u = torch.block_diag(*blocks), u

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.a, self.b])
        return 0.5 * z @ (self.A @ z) + self.u @ z + 0 * inputs.sum()


def test_model_groups_start_from_their_block_of_the_loss_gradient():
    (A1, Q1), (A2, Q2) = _slowly_separated_top(200, seed=1), _slowly_separated_top(150, seed=2)
    data = (torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))

    def loss_fn(outputs, targets):
        return outputs

    runs = {}
    for name, u in (
        ("cold", torch.zeros(350, dtype=DTYPE)),
        ("warm", torch.cat([Q1[:, 0], Q2[:, 0]])),
    ):
        model = _TwoBlocks([A1, A2], u)
        runs[name] = ts.model_top_eigenvalues(model, loss_fn, data, groups="parameter")
    for group in ("a", "b"):
        cold, warm = runs["cold"][group], runs["warm"][group]
        assert cold.converged
        assert warm.converged
        torch.testing.assert_close(warm.eigenvalues, torch.tensor([2.0], dtype=DTYPE))
        assert warm.num_matvecs <= cold.num_matvecs - 3
    # over several batches the gradient would take a pass of its own: random starts
    model = _TwoBlocks([A1, A2], torch.cat([Q1[:, 0], Q2[:, 0]]))
    streamed = ts.model_top_eigenvalues(model, loss_fn, [data, data], groups="parameter")
    assert [r.num_matvecs for r in streamed.values()] == [
        r.num_matvecs for r in runs["cold"].values()
    ]


def test_the_gradient_start_holds_no_vector_once_the_search_runs(monkeypatch):
    import weakref

    from torch_secorder.analysis import _lanczos, eigen

    A, Q = _slowly_separated_top(50, seed=3)
    x = torch.zeros(50, dtype=DTYPE, requires_grad=True)
    vectors, alive = [], []  # the gradient, and the start made of it
    kept_gradient, warm = eigen.kept_gradient, _lanczos._warm

    def spy(operator):
        gradient = kept_gradient(operator)
        vectors.append(weakref.ref(gradient))
        return gradient

    def spied_start(start, generator):
        made = warm(start, generator)
        vectors.append(weakref.ref(made))
        return made

    matmat = ts.HessianOperator.matmat

    def watched(self, V, **kwargs):
        alive.append([vector() is not None for vector in vectors])
        return matmat(self, V, **kwargs)

    monkeypatch.setattr(eigen, "kept_gradient", spy)
    monkeypatch.setattr(_lanczos, "_warm", spied_start)
    monkeypatch.setattr(ts.HessianOperator, "matmat", watched)
    result = ts.top_eigenvalues(lambda: 0.5 * x @ (A @ x) + Q[:, 0] @ x, [x])
    assert result.converged
    assert alive == [[False, False]] * result.num_matvecs


def test_a_gradient_start_finds_every_copy_of_a_repeated_top_eigenvalue():
    # the gradient along one copy of the top eigenvalue 5 (twice): the search of the found
    # pairs' complement, from a random vector, finds the other copy
    spectrum = torch.cat([torch.tensor([5.0, 5.0]), torch.linspace(-1, 3, 58)]).to(DTYPE)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=generator(4), dtype=DTYPE))
    A = (Q * spectrum) @ Q.T
    A = (A + A.T) / 2
    x = torch.zeros(60, dtype=DTYPE, requires_grad=True)
    result = ts.top_eigenvalues(lambda: 0.5 * x @ (A @ x) + Q[:, 0] @ x, [x], k=3)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([5.0, 5.0, 3.0], dtype=DTYPE))


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_each_eigenvector_has_its_largest_entry_positive(method):
    # (an eigenvector's sign is arbitrary; fixed so, rounding does not choose it)
    A = with_spectrum(indefinite(60))
    for seed in range(4):
        result = ts.top_eigenvalues(
            DenseOperator(A), k=2, which="magnitude", method=method, generator=generator(seed)
        )
        X = result.eigenvectors
        largest = X.gather(0, X.abs().argmax(dim=0)[None])
        assert bool((largest > 0).all())


@pytest.mark.parametrize("k", [1, 2])
def test_zero_eigenvalues_of_a_rank_deficient_hessian_converge(k):
    # Least squares with more parameters than samples: H has rank 3 of 11, its smallest
    # eigenvalues are zero. A residual at the rounding of the products converges against
    # the estimate of ||H|| the search saw, also where every pair returned is about zero.
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(10, 1).double()
    inputs = torch.randn(3, 10, generator=gen, dtype=DTYPE)
    targets = torch.randn(3, 1, generator=gen, dtype=DTYPE)
    H = ts.model_hessian_matrix(model, nn.MSELoss(), inputs, targets)
    norm = float(torch.linalg.eigvalsh(H).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (not converged would warn)
        result = ts.model_top_eigenvalues(
            model, nn.MSELoss(), (inputs, targets), k=k, which="smallest"
        )
    assert result.converged
    assert float(result.eigenvalues.abs().max()) < 1e-12 * norm
    assert float(result.residuals.max()) < 1e-12 * norm
