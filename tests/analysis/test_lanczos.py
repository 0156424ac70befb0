import pytest
import torch

from tests.analysis.operators import (
    DTYPE,
    DenseOperator,
    clustered,
    dominant,
    generator,
    indefinite,
    with_spectrum,
)
from torch_secorder.analysis import _lanczos
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._lanczos import (
    RitzPairs,
    _against_basis,
    _explicit,
    _restarted_lanczos,
    default_basis_size,
    lanczos_quadrature,
    thick_restart_lanczos,
    wanted_order,
)

CPU = torch.device("cpu")


class Recording(DenseOperator):
    """Keeps every requested column."""

    def __init__(self, A):
        super().__init__(A)
        self.columns = []

    def matmat(self, V):
        self.columns.append(V.clone())
        return super().matmat(V)


def without_kept_products(monkeypatch, k, basis_size, block_size=1):
    """A memory budget that holds the basis but not its products: pairs take a product each."""
    least = basis_size + k + 2 * block_size  # the basis and what it keeps besides
    monkeypatch.setattr(_lanczos, "kept_vectors", lambda *args: least + basis_size // 2)


def solve(A, k, which="largest", tol=1e-10, budget=1000, **kwargs):
    operator = Recording(A)
    steps = thick_restart_lanczos(
        A.shape[0], k, which, tol, budget, DTYPE, CPU, generator(0), **kwargs
    )
    problem = Problem(steps)
    (pairs,) = run("test", operator, [problem])
    return pairs, operator, problem


def test_lanczos_relation_and_orthonormal_basis():
    A = with_spectrum(indefinite(60))
    operator = Recording(A)
    steps = _restarted_lanczos(
        60, 1, 1000, None, None, "largest", 1e-12, DTYPE, CPU, generator(0), 1, 60, []
    )  # one run, without the verification in the complement
    ((pairs, used),) = run("test", operator, [Problem(steps)])
    Q = torch.cat(operator.columns, dim=1)  # without restarts, the requests are the basis
    assert Q.shape[1] == used
    s = Q.shape[1]
    torch.testing.assert_close(Q.T @ Q, torch.eye(s, dtype=DTYPE))
    T = Q.T @ A @ Q
    tridiagonal = torch.triu(torch.tril(T, 1), -1)
    torch.testing.assert_close(T, tridiagonal, rtol=0, atol=1e-10)
    # A Q = Q T + r e_s^T: the residual lives in the last column only
    R = A @ Q - Q @ T
    torch.testing.assert_close(R[:, :-1], torch.zeros(60, s - 1, dtype=DTYPE), rtol=0, atol=1e-10)
    # the residual norm of the Ritz pair equals the reported one
    torch.testing.assert_close(
        pairs.residuals,
        (A @ pairs.vectors - pairs.vectors * pairs.values).norm(dim=0),
        rtol=1e-3,
        atol=1e-12,
    )


class Diagonal:
    """``diag(d)`` behind the operator protocol, for operators too large to store densely."""

    def __init__(self, d):
        self.d = d
        self.shape = (len(d), len(d))
        self.dtype = d.dtype
        self.device = d.device
        self.columns = []

    def matmat(self, V):
        self.columns.append(V.clone())
        return self.d[:, None] * V


def test_a_large_float32_basis_stays_orthonormal():
    # Lanczos vectors normalised by float32 norms of 1M entries were off by 3e-5
    d = torch.rand(2**20, generator=generator(1))
    operator = Diagonal(d)
    steps = _restarted_lanczos(
        len(d), 1, 8, None, None, "largest", 1e-12, torch.float32, CPU, generator(2), 1, 8, []
    )
    run("test", operator, [Problem(steps)])
    Q = torch.cat(operator.columns, dim=1).double()  # without restarts, the requests are the basis
    assert Q.shape[1] == 8
    torch.testing.assert_close(Q.T @ Q, torch.eye(8, dtype=torch.float64), rtol=0, atol=2e-6)


def test_explicit_residuals_of_float32_pairs_are_summed_in_float64():
    # a float32 norm of 2M entries is off by 6e-5: the Rayleigh quotient of the vector it
    # normalised, and its residual, were biased by as much
    g = generator(3)
    d = torch.rand(2**21, generator=g)
    x = torch.randn(2**21, 1, generator=g)  # spread over all entries
    steps = _explicit(RitzPairs(d[:1], x, d[:1], True), None, "largest", 1e-4, torch.float32, True)
    X = next(steps)
    AX = d[:, None] * X
    with pytest.raises(StopIteration) as stop:
        steps.send(AX)
    pairs = stop.value.value
    Xd, AXd = pairs.vectors.double(), AX.double()
    theta = (Xd * AXd).sum() / (Xd * Xd).sum()
    residual = (AXd - theta * Xd).norm() / Xd.norm()
    # float32 results: one rounding from the float64 sums
    torch.testing.assert_close(pairs.values.double(), theta.reshape(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(pairs.residuals.double(), residual.reshape(1), rtol=1e-7, atol=0)
    assert abs(float(Xd.norm()) - 1) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_step_orthogonalises_twice_where_the_first_pass_cancels(dtype):
    # W lies in the span of the basis up to 1e-3 of its norm: one classical Gram-Schmidt pass
    # leaves components of 1e3 times the rounding unit, the second (twice is enough) removes them
    g = generator(4)
    n, j = 300, 6
    Q, _ = torch.linalg.qr(torch.randn(n, j + 3, generator=g, dtype=torch.float64))
    V = torch.zeros(j + 1, n, dtype=dtype)
    V[:j] = Q[:, :j].T.to(dtype)
    locked = Q[:, j : j + 2].to(dtype)
    W = Q[:, :j] @ torch.randn(j, 1, generator=g, dtype=torch.float64)
    W += Q[:, j : j + 2] @ torch.full((2, 1), 1e-2, dtype=torch.float64) + 1e-3 * Q[:, j + 2 :]
    W = W.to(dtype)
    V[j] = W[:, 0]  # the product, written below the basis, is orthogonalised in place
    H, size = _against_basis(V[j:].T, V, j, j - 2, locked)
    new, eps = V[j].double(), torch.finfo(dtype).eps
    assert float((Q[:, : j + 2].T @ new).abs().max()) < 10 * eps
    assert abs(float(new.norm()) - 1) < 10 * eps
    # the step's relation: W = V^T H + (its part along locked) + |remainder| new
    Wd, L = W.double(), locked.double()
    rebuilt = V[:j].double().T @ H + L @ (L.T @ Wd) + size.sqrt() * new[:, None]
    torch.testing.assert_close(rebuilt, Wd, rtol=0, atol=10 * eps * float(Wd.norm()))


@pytest.mark.parametrize("keeps_products", [True, False])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_thick_restart_converges_with_a_small_basis(which, keeps_products, monkeypatch):
    if not keeps_products:
        without_kept_products(monkeypatch, 3, 8)
    lam = clustered()
    A = with_spectrum(lam)
    pairs, operator, problem = solve(A, 3, which, tol=1e-8, basis_size=8, budget=5000)
    assert pairs.converged
    assert problem.num_matvecs > 8  # it restarted
    truth = lam[wanted_order(lam, which)][:3]
    torch.testing.assert_close(pairs.values, truth)
    torch.testing.assert_close(pairs.vectors.T @ pairs.vectors, torch.eye(3, dtype=DTYPE))
    if keeps_products:  # the explicit residuals from the basis's products: every step one column
        assert max(c.shape[1] for c in operator.columns) == 1
    else:
        *steps, check = operator.columns
        assert max(c.shape[1] for c in steps) == 1
        assert check.shape[1] == 3  # the explicit residuals: one product per pair


@pytest.mark.parametrize("keeps_products", [True, False])
def test_the_residuals_reported_are_explicit(keeps_products, monkeypatch):
    if not keeps_products:
        without_kept_products(monkeypatch, 3, 8)
    lam = clustered()
    A = with_spectrum(lam)
    pairs, operator, _ = solve(A, 3, tol=1e-8, basis_size=8, budget=5000)
    torch.testing.assert_close(pairs.vectors.norm(dim=0), torch.ones(3, dtype=DTYPE))
    torch.testing.assert_close(pairs.values, (pairs.vectors * (A @ pairs.vectors)).sum(dim=0))
    explicit = (A @ pairs.vectors - pairs.vectors * pairs.values).norm(dim=0)
    # (the kept products combine several rounded products: the same to rounding, 1e-14 here)
    torch.testing.assert_close(pairs.residuals, explicit, rtol=1e-6, atol=1e-13)
    assert bool((explicit <= 1e-8 * pairs.values.abs()).all())


class _Rounding(DenseOperator):
    """Products rounded to float32 and back: the recurrence's residual estimates drift."""

    def matmat(self, V):
        return super().matmat(V).float().double()


def test_converged_only_when_the_explicit_residuals_meet_the_tolerance():
    A = with_spectrum(clustered())
    operator = _Rounding(A)
    steps = thick_restart_lanczos(A.shape[0], 2, "largest", 1e-9, 400, DTYPE, CPU, generator(0))
    problem = Problem(steps)
    (pairs,) = run("test", operator, [problem])
    explicit = (operator.matmat(pairs.vectors) - pairs.vectors * pairs.values).norm(dim=0)
    # At the products' rounding: the kept products' rounding, of the same order and no larger
    # than a fresh product's (a product's rounding grows with its size, and the basis vectors'
    # products are no larger than the top Ritz vector's).
    ratio = pairs.residuals / explicit
    assert bool(((ratio > 0.1) & (ratio < 1.5)).all()), ratio
    assert not bool((explicit <= 1e-9 * pairs.values.abs()).all())  # float32 cannot meet 1e-9
    assert not pairs.converged  # and it says so
    assert pairs.stalled  # a refinement did not halve the residuals: rounding, not the budget
    assert problem.num_matvecs <= 400


def test_a_float32_refinement_aims_no_lower_than_its_rounding():
    # Explicit residuals just above tol (float32 rounding leaves 3e-7 to 8e-7 relative here):
    # refinements aiming below float32's rounding unit ran their recurrence until the budget
    # was spent.
    A = with_spectrum(clustered(), seed=2).float()
    steps = thick_restart_lanczos(
        A.shape[0], 4, "largest", 3e-7, 400, torch.float32, CPU, generator(2)
    )
    problem = Problem(steps)
    (pairs,) = run("test", DenseOperator(A), [problem])
    explicit = (A @ pairs.vectors - pairs.vectors * pairs.values).norm(dim=0)
    assert not pairs.converged
    assert pairs.stalled
    assert not bool((explicit <= 3e-7 * pairs.values.abs()).all())
    assert problem.num_matvecs < 400  # the whole budget before


def test_a_search_out_of_products_has_not_stalled():
    A = with_spectrum(clustered())
    pairs, _, problem = solve(A, 2, tol=1e-12, budget=6)
    assert not pairs.converged
    assert not pairs.stalled
    assert problem.num_matvecs == 6


@pytest.mark.parametrize("block_size", [2, 3])
def test_block_lanczos(block_size):
    lam = dominant(120)
    A = with_spectrum(lam)
    pairs, operator, problem = solve(A, 4, block_size=block_size, basis_size=24)
    assert pairs.converged
    torch.testing.assert_close(pairs.values, lam[:4])
    assert all(c.shape[1] <= block_size for c in operator.columns)  # no check of four
    assert problem.num_matvecs == operator.num_matvecs


def test_block_lanczos_sees_a_double_eigenvalue():
    lam = torch.cat([torch.tensor([5.0, 5.0], dtype=DTYPE), torch.linspace(0, 4, 58, dtype=DTYPE)])
    pairs, _, _ = solve(with_spectrum(lam), 2, block_size=2)
    torch.testing.assert_close(pairs.values, torch.tensor([5.0, 5.0], dtype=DTYPE))


@pytest.mark.parametrize("keeps_products", [True, False])
def test_budget_is_used_exactly_with_a_partial_last_block(keeps_products, monkeypatch):
    if not keeps_products:
        without_kept_products(monkeypatch, 2, default_basis_size(2, 3), 3)
    pairs, operator, problem = solve(with_spectrum(clustered()), 2, budget=7, block_size=3)
    assert not pairs.converged
    assert problem.num_matvecs == operator.num_matvecs == 7
    # where the basis's products are not kept, 2 are kept back to check the pairs
    columns = [3, 3, 1] if keeps_products else [3, 2, 2]
    assert [c.shape[1] for c in operator.columns] == columns


def test_default_basis_size():
    assert default_basis_size(1) == 20
    assert default_basis_size(15) == 32
    assert default_basis_size(15, 4) == 38


def test_quadrature_relation_per_probe():
    A = with_spectrum(dominant(40))
    operator = Recording(A)
    steps = lanczos_quadrature(40, 8, 3, DTYPE, CPU, generator(0))
    problem = Problem(steps)
    ((nodes, weights),) = run("test", operator, [problem])
    assert [c.shape[1] for c in operator.columns] == [3] * 8
    for p in range(3):
        Q = torch.stack([c[:, p] for c in operator.columns], dim=1)
        torch.testing.assert_close(Q.T @ Q, torch.eye(8, dtype=DTYPE))
        # the probe is a scaled Rademacher vector
        torch.testing.assert_close(Q[:, 0].abs(), torch.full((40,), 40**-0.5, dtype=DTYPE))
        T = Q.T @ A @ Q
        torch.testing.assert_close(T, torch.triu(torch.tril(T, 1), -1), rtol=0, atol=1e-10)
        theta, Y = torch.linalg.eigh(T)
        torch.testing.assert_close(nodes[p], theta)
        torch.testing.assert_close(weights[p], Y[0] ** 2)


def test_probes_run_together_match_probes_run_one_at_a_time():
    # each probe is orthogonalised against its own basis only: running them together
    # changes nothing (the probes are drawn in order, so one generator gives the same ones)
    A = with_spectrum(dominant(40))
    (together,) = run(
        "test", Recording(A), [Problem(lanczos_quadrature(40, 12, 3, DTYPE, CPU, generator(4)))]
    )
    gen = generator(4)
    alone = [
        run("test", Recording(A), [Problem(lanczos_quadrature(40, 12, 1, DTYPE, CPU, gen))])[0]
        for _ in range(3)
    ]
    torch.testing.assert_close(together[0], torch.cat([nodes for nodes, _ in alone]))
    torch.testing.assert_close(together[1], torch.cat([weights for _, weights in alone]))


def test_quadrature_runs_probes_in_groups_when_memory_is_short(monkeypatch):
    A = with_spectrum(dominant(40))
    whole = Recording(A)
    (expected,) = run(
        "test", whole, [Problem(lanczos_quadrature(40, 8, 5, DTYPE, CPU, generator(0)))]
    )
    monkeypatch.setattr("torch_secorder.analysis._lanczos.BASIS_BYTES", 2 * 8 * 40 * 8)
    grouped = Recording(A)
    (got,) = run("test", grouped, [Problem(lanczos_quadrature(40, 8, 5, DTYPE, CPU, generator(0)))])
    assert [c.shape[1] for c in whole.columns] == [5] * 8
    assert [c.shape[1] for c in grouped.columns] == [2] * 16 + [1] * 8
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("limit", ["BASIS_BYTES", "WINDOW_BYTES"])
def test_a_quadrature_keeping_its_last_vectors_reproduces_the_moments(monkeypatch, limit):
    # 40 steps with room for 12 vectors of the basis (memory, or the window that bounds the
    # reorthogonalisation's cost): Gauss quadrature still reproduces the probe's moments
    # z^T A^k z and puts nodes at the spectrum's edges
    lam = dominant(200)
    A = with_spectrum(lam)
    monkeypatch.setattr(f"torch_secorder.analysis._lanczos.{limit}", 12 * 200 * 8)
    operator = Recording(A)
    ((nodes, weights),) = run(
        "test", operator, [Problem(lanczos_quadrature(200, 40, 1, DTYPE, CPU, generator(2)))]
    )
    assert len(operator.columns) == 40
    z = operator.columns[0][:, 0]
    power = z.clone()
    for k in range(8):
        moment = (weights[0] * nodes[0] ** k).sum()
        torch.testing.assert_close(moment, z @ power, rtol=1e-9, atol=1e-12)
        power = A @ power
    torch.testing.assert_close(nodes[0].max(), lam.max(), rtol=1e-9, atol=0)
    assert abs(nodes[0].min() - lam.min()) <= 1e-3 * (lam.max() - lam.min())
    # the last vector is orthogonal to its 11 predecessors, not to the older ones
    Q = torch.stack([c[:, 0] for c in operator.columns], dim=1)
    overlaps = (Q[:, :-1].T @ Q[:, -1]).abs()
    assert overlaps[-11:].max() < 1e-13 < overlaps[:-11].max()


def kron_identity(copies, size, seed=0):
    """I_copies (x) C: every eigenvalue of C repeated ``copies`` times (a last layer's block)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(size, size, generator=g, dtype=DTYPE)
    return torch.kron(torch.eye(copies, dtype=DTYPE), C @ C.T / size), C @ C.T / size


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("copies", [2, 3])
def test_repeated_eigenvalues_among_distinct_ones_are_all_found(which, copies):
    g = torch.Generator().manual_seed(3)
    rest = torch.rand(100, generator=g, dtype=DTYPE) * 4 - 2  # in [-2, 2]
    extreme = {"largest": 10.0, "smallest": -10.0, "magnitude": -10.0}[which]
    lam = torch.cat(
        [
            torch.full((copies,), extreme, dtype=DTYPE),
            torch.tensor([7.0, -6.0, 5.0], dtype=DTYPE),
            rest,
        ]
    )
    A = with_spectrum(lam)
    pairs, _, _ = solve(A, copies + 1, which, tol=1e-10)
    assert pairs.converged
    truth = lam[wanted_order(lam, which)][: copies + 1]
    torch.testing.assert_close(pairs.values, truth)
    X = pairs.vectors
    torch.testing.assert_close(X.T @ X, torch.eye(copies + 1, dtype=DTYPE))
    torch.testing.assert_close(A @ X, X * pairs.values, rtol=0, atol=1e-8)


def test_kronecker_block_returns_every_copy():
    A, C = kron_identity(10, 40)
    pairs, _, _ = solve(A, 5, tol=1e-10)
    assert pairs.converged
    top = torch.linalg.eigvalsh(C)[-1]
    torch.testing.assert_close(pairs.values, top.repeat(5))
    pairs, _, _ = solve(A, 12, tol=1e-10)  # ten copies of the top, then the second
    second = torch.linalg.eigvalsh(C)[-2]
    torch.testing.assert_close(pairs.values, torch.cat([top.repeat(10), second.repeat(2)]))


def test_verification_is_cheap_with_a_gap():
    lam = torch.cat([torch.tensor([10.0, 9.0, 5.0]), torch.linspace(0, 1, 97)]).to(DTYPE)
    A = with_spectrum(lam)
    pairs, _, problem = solve(A, 2, tol=1e-8)
    torch.testing.assert_close(pairs.values, lam[:2])
    main = _restarted_lanczos(
        100, 2, 1000, None, None, "largest", 1e-8, DTYPE, CPU, generator(0), 1, None, []
    )
    ((_, used),) = run("test", Recording(A), [Problem(main)])
    # the complement's top (5) is told apart from 9 quickly; two explicit residuals
    assert problem.num_matvecs - used <= 8


@pytest.mark.parametrize("keeps_products", [True, False])
def test_one_eigenpair_takes_the_lanczos_steps_and_its_check(keeps_products, monkeypatch):
    if not keeps_products:
        without_kept_products(monkeypatch, 1, default_basis_size(1))
    # (another copy of the top eigenvalue would not change the result: no complement search)
    A = with_spectrum(torch.tensor([10.0, 10.0, 10.0, *torch.linspace(0, 5, 57)], dtype=DTYPE))
    main = _restarted_lanczos(
        60, 1, 1000, None, None, "largest", 1e-8, DTYPE, CPU, generator(0), 1, None, []
    )
    ((found, used),) = run("test", Recording(A), [Problem(main)])
    assert (found.products is not None) == keeps_products
    if keeps_products:  # the kept products are the basis's: A x to rounding
        torch.testing.assert_close(found.products, A @ found.vectors)
    pairs, _, problem = solve(A, 1, tol=1e-8)
    assert pairs.converged
    assert pairs.products is None  # what the solver returns keeps no products
    torch.testing.assert_close(pairs.values, torch.tensor([10.0], dtype=DTYPE))
    assert problem.num_matvecs == used + (0 if keeps_products else 1)


@pytest.mark.parametrize("room", [0, -1])
def test_the_products_are_kept_up_to_their_memory_limit(room, monkeypatch):
    # the default basis of 20 vectors of 60 float64 entries: 9,600 bytes of products
    monkeypatch.setattr(_lanczos, "PRODUCTS_BYTES", 20 * 60 * 8 + room)
    A = with_spectrum(indefinite(60))
    main = _restarted_lanczos(
        60, 1, 1000, None, None, "largest", 1e-8, DTYPE, CPU, generator(0), 1, None, []
    )
    ((found, _),) = run("test", Recording(A), [Problem(main)])
    assert (found.products is not None) == (room == 0)


@pytest.mark.parametrize("k", [1, 2])
def test_a_warm_start_finds_an_eigenvalue_that_overtook_the_ones_given(k):
    # the start spans the eigenvectors of 9 and 8 exactly: the eigenvalue 10 has no component
    # in it, and a Krylov space grown from it alone would never see 10
    lam = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(-1, 1, 97)]).to(DTYPE)
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=DTYPE))
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    steps = thick_restart_lanczos(
        100, k, "largest", 1e-8, 1000, DTYPE, CPU, generator(1), start=Q[:, 1 : 1 + k]
    )
    (pairs,) = run("test", DenseOperator(A), [Problem(steps)])
    assert pairs.converged
    torch.testing.assert_close(pairs.values, lam[:k])


def test_a_warm_start_from_the_eigenvectors_of_a_nearby_operator_takes_fewer_products():
    lam = clustered()
    A = with_spectrum(lam)
    cold, _, cold_problem = solve(A, 2, tol=1e-8)
    B = A + 1e-3 * with_spectrum(torch.linspace(-1, 1, A.shape[0], dtype=DTYPE))
    steps = thick_restart_lanczos(
        A.shape[0], 2, "largest", 1e-8, 1000, DTYPE, CPU, generator(1), start=cold.vectors
    )
    warm_problem = Problem(steps)
    (warm,) = run("test", DenseOperator(B), [warm_problem])
    again, _, again_problem = solve(B, 2, tol=1e-8)
    assert warm.converged
    assert again.converged
    torch.testing.assert_close(warm.values, again.values, rtol=1e-7, atol=0)
    assert warm_problem.num_matvecs < again_problem.num_matvecs


def test_float32_quadrature_of_millions_of_entries_sums_accurately():
    # A diagonal operator and a Rademacher probe: Gauss quadrature is exact to degree 2s - 1,
    # sum_j tau_j theta_j^m = z^T A^m z / z^T z = mean(d^m), also after 2^22 float32 terms.
    n = 2**22
    d = torch.rand(n, generator=generator(5), dtype=torch.float64).float().double()
    operator = Diagonal(d.float())
    steps = lanczos_quadrature(n, 3, 1, torch.float32, CPU, generator(6))
    ((nodes, weights),) = run("test", operator, [Problem(steps)])
    for m in (1, 2, 3):
        moment = float((nodes.double() ** m * weights.double()).sum())
        assert abs(moment - float((d**m).mean())) <= 1e-5 * float((d**m).mean())
