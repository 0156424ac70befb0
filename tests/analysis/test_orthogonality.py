import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import (
    DTYPE,
    DenseOperator,
    clustered,
    dominant,
    generator,
    indefinite,
    with_spectrum,
)
from torch_secorder.analysis import _lanczos, _orthogonality
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._lanczos import _restarted_lanczos, thick_restart_lanczos
from torch_secorder.analysis._orthogonality import NOISE

CPU = torch.device("cpu")


class Recording(DenseOperator):
    """Keeps every requested column (without restarts, the requests are the basis)."""

    def __init__(self, A, rounded=False):
        super().__init__(A)
        self.columns = []
        self.rounded = rounded

    def matmat(self, V):
        self.columns.append(V.clone())
        product = super().matmat(V)
        return product.float().to(V.dtype) if self.rounded else product


class Diagonal(Recording):
    """``diag(d)``, not stored densely."""

    def __init__(self, d):
        super().__init__(d[:1, None])
        self.d = d
        self.shape, self.dtype = (len(d), len(d)), d.dtype

    def matmat(self, V):
        self.columns.append(V.clone())
        return self.d[:, None] * V


@pytest.fixture
def estimates(monkeypatch):
    """The estimators the searches make, kept to read their passes."""
    made = []

    class Kept(_orthogonality.Semiorthogonality):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(_lanczos, "Semiorthogonality", Kept)
    monkeypatch.setattr(_lanczos, "SEMIORTHOGONAL_BYTES", 0)  # also on small operators
    return made


def search(operator, tol, steps, dtype=DTYPE):
    """One search of ``steps`` products without a restart."""
    n = operator.shape[0]
    lanczos = _restarted_lanczos(
        n, 1, steps, None, None, "largest", tol, dtype, CPU, generator(0), 1, steps, []
    )
    ((pairs, used),) = run("test", operator, [Problem(lanczos)])
    return pairs, used


def loss_of_orthogonality(operator):
    Q = torch.cat(operator.columns, dim=1).double()
    return float((Q.T @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max())


SPECTRA = {"dominant": dominant(300), "clustered": clustered(300), "indefinite": indefinite(300)}


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("rounded", [False, True])
def test_the_basis_keeps_its_level_of_orthogonality(estimates, spectrum, rounded):
    # rounded: products rounded to float32 in a float64 search (their rounding, and their
    # asymmetry, 1e8 times the dtype's), which the estimates must see
    A = with_spectrum(SPECTRA[spectrum])
    operator = Recording(A, rounded=rounded)
    tol = 1e-8
    pairs, used = search(operator, tol, 80)
    (semi,) = estimates
    assert semi.level <= tol  # (tol times the top Ritz value over the largest seen)
    assert loss_of_orthogonality(operator) <= tol
    if rounded:
        assert semi.rounding > 1e6 * NOISE * torch.finfo(DTYPE).eps
    else:  # the products are symmetric to rounding: most steps skip the pass
        assert semi.passes <= used / 4
    if pairs.converged:
        top = torch.linalg.eigvalsh(A)[-1]
        assert abs(float(pairs.values[0] - top)) <= tol * float(top)
    else:  # (the clustered spectrum's top eigenvalues are 1e-4 apart)
        assert spectrum == "clustered"
        assert used == 80


def test_a_float32_search_of_a_million_entries_takes_few_passes(estimates):
    d = 0.9 * torch.rand(2**20, generator=generator(1))
    d[:3] = torch.tensor([1.0, 0.97, 0.95])
    operator = Diagonal(d)
    pairs, used = search(operator, 1e-4, 60, dtype=torch.float32)
    (semi,) = estimates
    assert semi.level == pytest.approx(1e-4)  # below float32's square root of the rounding unit
    assert pairs.converged
    assert semi.passes <= used / 2
    assert loss_of_orthogonality(operator) <= semi.level
    assert abs(float(pairs.values[0]) - float(d.max())) <= 1e-4 * float(d.max())


def test_repeated_eigenvalues_at_a_tight_tolerance(estimates):
    # with the passes' coefficients of order eta |A| in the projected matrix, or eta the
    # square root of the rounding unit, the pairs' residuals stalled above 1e-10 relative
    g = torch.Generator().manual_seed(3)
    rest = torch.rand(100, generator=g, dtype=DTYPE) * 4 - 2
    lam = torch.cat([torch.full((3,), -10.0, dtype=DTYPE), torch.tensor([7.0, -6.0, 5.0]), rest])
    A = with_spectrum(lam)
    n, tol = len(lam), 1e-10
    steps = thick_restart_lanczos(n, 4, "smallest", tol, 1000, DTYPE, CPU, generator(0))
    (pairs,) = run("test", DenseOperator(A), [Problem(steps)])
    assert estimates[0].passes < estimates[0].omega.shape[0] - 1  # (passes were skipped)
    assert pairs.converged
    torch.testing.assert_close(pairs.values, lam.sort().values[:4].to(DTYPE))
    residuals = (A @ pairs.vectors - pairs.vectors * pairs.values).norm(dim=0)
    assert bool((residuals <= tol * pairs.values.abs()).all())


def test_the_level_follows_the_least_wanted_pair(estimates):
    # k = 6 of diag(1/i^2): with the level at tol relative to |A|, the sixth pair's Ritz
    # vector (theta = |A| / 36) missed tol in 3 of 10 searches, which then stalled
    n = 2**18
    d = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2
    d = d[torch.randperm(n, generator=generator(3))].float()
    operator = Diagonal(d)
    for seed in range(10):
        result = ts.top_eigenvalues(operator, k=6, generator=generator(seed))
        assert result.converged
        assert estimates[-1].level == pytest.approx(1e-4 / 36, rel=1e-3)
        X = result.eigenvectors
        residuals = (d[:, None] * X - X * result.eigenvalues).norm(dim=0)
        assert bool((residuals <= 1e-4 * result.eigenvalues).all())
