"""Analysis model forms on the real architectures against the oracle.

Each analysis runs on one batch and on a data set, for a parameter subset of two to four
modules (:attr:`~tests.real.models.Arch.small`) with ``groups=None`` and ``groups="module"``
(each module's own diagonal block). Budgets make the estimators exact (Hutch++ and XDiag
sketches spanning each block, Lanczos quadrature running as many steps as a block has rows),
so they are compared with the dense oracle at the default float64 tolerances; Lanczos runs
with its defaults, its eigenvalues are checked within its documented bound and its Ritz
values as the exact Rayleigh quotients of its vectors. Top eigenpairs of all parameters are
checked by their residuals with the oracle's hand-written Hessian-vector product. Every call
is followed by the no-side-effect snapshot; calls with groups are repeated for bitwise
reproducibility.
"""

import pytest
import torch
from torch.testing import assert_close

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import checked, reproducible

GROUPS = pytest.mark.parametrize("groups", [None, "module"])
EPS13 = torch.finfo(torch.float64).eps ** (1 / 3)


def rows(arch, names, groups):
    """Group name -> rows of the oracle's subset Hessian (``None``: all of ``names``)."""
    named = dict(arch.model.named_parameters())
    offsets, start = {}, 0
    for name in arch.subset:
        offsets[name] = torch.arange(start, start + named[name].numel())
        start += named[name].numel()
    if groups is None:
        return {None: torch.cat([offsets[n] for n in names])}
    return {
        module: torch.cat([offsets[n] for n in names if n.rpartition(".")[0] == module])
        for module in arch.modules(names)
    }


def analyse(fn, arch, kind, groups, names, *, repeat=True, **options):
    """Run ``fn`` on ``names``; pair each group's result with its block of the oracle.

    With groups and ``repeat``, the call is made twice and must give identical results (the
    sequential solvers repeat on one batch only: a product over the data set costs a pass).
    """
    call = reproducible if groups is not None and repeat else checked
    result = call(
        arch.model,
        fn,
        arch.model,
        arch.loss_fn,
        arch.library_data(kind),
        params=names,
        groups=groups,
        **options,
    )
    H = oracle.arch_hessian(arch.name, arch.mode, kind)
    blocks = rows(arch, names, groups)
    if groups is None:
        result = {None: result}
    assert list(result) == list(blocks)
    return [(result[key], H[idx][:, idx]) for key, idx in blocks.items()]


def largest(arch, names, groups):
    return max(idx.numel() for idx in rows(arch, names, groups).values())


@GROUPS
def test_trace(arch, kind, groups):
    names = arch.small
    for result, block in analyse(
        ts.model_hessian_trace, arch, kind, groups, names, repeat=False, method="exact"
    ):
        assert_close(result.value, block.trace())
    # Hutch++ with a sketch of budget / 3 >= (block size) columns spans each block: exact
    budget = 3 * largest(arch, names, groups)
    for result, block in analyse(
        ts.model_hessian_trace, arch, kind, groups, names, method="hutch++", num_matvecs=budget
    ):
        assert_close(result.value, block.trace())
        assert result.num_matvecs <= budget


@GROUPS
def test_exact_trace_products(arch, kind, groups):
    """The exact trace takes a block's unit-vector products, or fewer (layer structure); a
    product over the data set counts one."""
    for result, block in analyse(
        ts.model_hessian_trace, arch, kind, groups, arch.small, repeat=False, method="exact"
    ):
        assert result.num_matvecs <= block.shape[0]


@GROUPS
def test_diagonal_estimate(arch, kind, groups):
    names = arch.small
    # XDiag with a sketch of budget / 2 >= (block size) columns spans each block: exact
    budget = 2 * largest(arch, names, groups)
    for result, block in analyse(
        ts.model_hessian_diagonal_estimate, arch, kind, groups, names, num_matvecs=budget
    ):
        assert type(result.diagonal) is list
        assert_close(oracle.flat(result.diagonal), block.diagonal())


@GROUPS
def test_top_eigenvalues(arch, kind, groups):
    """Default Lanczos (``tol=1e-4``) against the oracle's block."""
    k = 2
    for result, block in analyse(
        ts.model_top_eigenvalues, arch, kind, groups, arch.small, repeat=kind == "batch", k=k
    ):
        expected = torch.linalg.eigvalsh(block).flip(0)[:k]
        norm = float(torch.linalg.matrix_norm(block, ord=2))
        # |theta - lambda| <= ||H x - theta x|| <= tol max(|theta|, eps^(1/3) ||H||), + rounding
        bound = 1e-4 * torch.clamp(expected.abs(), min=EPS13 * norm) + 1e-13 * norm
        assert result.converged
        assert ((result.eigenvalues - expected).abs() <= bound).all()
        X = torch.cat([e.reshape(k, -1) for e in result.eigenvectors], dim=1).T
        assert_close(X.T @ X, torch.eye(k, dtype=X.dtype))
        # Ritz values are the Rayleigh quotients of their vectors: exact, whatever the tolerance
        assert_close((X * (block @ X)).sum(dim=0), result.eigenvalues)
        residuals = (block @ X - X * result.eigenvalues).norm(dim=0)
        assert (residuals <= bound).all()
        # a residual is a difference of nearly equal products (|theta| ~ 1e4 its size at
        # tol=1e-4): rounding of the products, ~1e-16 ||H||, is a larger part of it
        assert_close(result.residuals, residuals, rtol=1e-6, atol=1e-13 * norm)


@GROUPS
def test_spectral_density(arch, kind, groups):
    probes = 2
    steps = largest(arch, arch.small, groups)  # a full run per probe: nodes are eigenvalues
    for result, block in analyse(
        ts.model_spectral_density,
        arch,
        kind,
        groups,
        arch.small,
        repeat=kind == "batch",
        num_matvecs=probes * steps,
        num_probes=probes,
        grid_size=200,
    ):
        eigenvalues = torch.linalg.eigvalsh(block)
        norm = float(eigenvalues.abs().max())
        assert_close(result.weights.sum(dim=1), torch.ones(probes, dtype=torch.float64))
        assert_close(torch.trapezoid(result.density, result.grid), torch.tensor(1.0).double())
        live = result.nodes[result.weights > 0]
        # a probe stops once beta <= sqrt(eps) ||H||: its nodes are then exact to about that
        distance = (live[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
        assert (distance <= 1e-7 * norm).all()
        assert_close(live.max(), eigenvalues[-1], rtol=0, atol=1e-7 * norm)
        assert_close(live.min(), eigenvalues[0], rtol=0, atol=1e-7 * norm)


def test_top_eigenvalues_all_parameters(arch, kind):
    """Default Lanczos on all parameters: residuals by the oracle's hand-written product."""
    k = 2
    batches = arch.data(kind)
    result = checked(
        arch.model,
        ts.model_top_eigenvalues,
        arch.model,
        arch.loss_fn,
        arch.library_data(kind),
        k=k,
    )
    assert result.converged
    assert result.eigenvalues[0] >= result.eigenvalues[1]
    top = float(result.eigenvalues.abs().max())
    for j in range(k):
        x = [e[j] for e in result.eigenvectors]
        Hx = oracle.hvp(arch.model, arch.loss_fn, batches, x)
        theta = result.eigenvalues[j]
        assert_close(oracle.flat(x).norm(), torch.tensor(1.0).double())
        # a Ritz value is the Rayleigh quotient of its Ritz vector, to rounding
        assert_close(oracle.flat(x) @ oracle.flat(Hx), theta)
        residual = (oracle.flat(Hx) - theta * oracle.flat(x)).norm()
        # the default tol=1e-4 is relative to max(|theta|, eps^(1/3) ||H||), ||H|| >= |theta_1|
        assert residual <= 1e-4 * max(abs(float(theta)), EPS13 * top)
        # the reported residual is of the library's products, this one of the oracle's: they
        # differ by rounding, ~1e-16 ||H|| per entry, a larger part of a small residual
        assert_close(result.residuals[j], residual, rtol=1e-6, atol=1e-12 * top)
