r"""The eigen-solvers of :func:`~torch_secorder.top_eigenvalues` as product-requesting generators.

Power iteration with deflation lives here, thick-restart Lanczos in :mod:`._lanczos`;
:func:`eigen_steps` picks one by name and :func:`default_max_matvecs` gives their default
budgets; :func:`model_eigenpairs` runs them over a model's data, as
:func:`~torch_secorder.model_top_eigenvalues` and :func:`~torch_secorder.model_sharpness` do.
The methods and their stopping rules are described in :mod:`torch_secorder.analysis.eigen`,
which holds the public functions.
"""

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.analysis._driver import Steps
from torch_secorder.analysis._groups import run_model
from torch_secorder.analysis._lanczos import (
    RitzPairs,
    check_basis,
    thick_restart_lanczos,
    wanted_order,
)
from torch_secorder.analysis._memory import check_room
from torch_secorder.analysis._sampling import gaussian
from torch_secorder.analysis.results import EigenResult
from torch_secorder.core.params import unflatten

POWER_ITERATIONS = 100
"""Power iterations per eigenpair in the default budget (PyHessian's ``maxIter``)."""


def default_max_matvecs(method: str, k: int, which: str) -> int:
    """Default budget: :math:`100k + 200` for Lanczos; 100 per power run (PyHessian)."""
    if method == "lanczos":
        return 100 * k + 200
    return POWER_ITERATIONS * power_runs(k, which)


def power_runs(k: int, which: str) -> int:
    return k if which == "magnitude" else k + 1


def eigen_steps(
    method: str,
    n: int,
    k: int,
    which: str,
    tol: float,
    budget: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    gradient: Callable[[], Tensor | None] | None = None,
    reach: list[float] | None = None,
    *,
    span: int | None = None,
) -> Steps:
    """The eigen-solver ``method`` as a product-requesting generator returning RitzPairs.

    Where ``gradient()`` gives the loss gradient ``(n,)`` (asked for when the first product
    is) and the wanted end is not the smallest, Lanczos starts from its direction plus a
    random unit vector (``start`` of :func:`~._lanczos.thick_restart_lanczos`): a network's
    loss gradient lies largely in the top eigenspace of its Hessian (Gur-Ari et al. 2018),
    and the random half keeps every eigenspace in the Krylov space, as a random start does.
    Else, and for power iteration (as in PyHessian), the start is random. ``reach`` is shared
    by the searches of one operator's diagonal blocks (``reach`` of
    :func:`~._lanczos.thick_restart_lanczos`). Each returned vector's entry of largest
    magnitude is positive.
    """
    if method == "power":
        steps = power_iteration(n, k, which, tol, budget, dtype, device, gen, span=span)
        pairs = yield from steps
        return _signed(pairs)
    check_basis(n, k, dtype, device)  # (a refusal before the gradient's forward pass)
    start = gradient() if gradient is not None and which != "smallest" else None
    column = None if start is None else start[:, None]
    steps = thick_restart_lanczos(
        n, k, which, tol, budget, dtype, device, gen, start=column, reach=reach
    )
    gradient = start = column = None  # (the search's start replaces the gradient: none kept here)
    return _signed((yield from steps))


def _signed(pairs: RitzPairs) -> RitzPairs:
    """The pairs with each vector's entry of largest magnitude positive (the first of ties).

    An eigenvector's sign is arbitrary: fixed so, it does not depend on the rounding that
    chose it (a thread count, a machine).
    """
    if pairs.vectors.numel():
        rows = pairs.vectors.abs().argmax(dim=0)
        picked = pairs.vectors.gather(0, rows[None]).sign()
        pairs.vectors *= torch.where(picked == 0, 1, picked)
    return pairs


def power_iteration(
    n: int,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    *,
    span: int | None = None,
) -> Steps:
    r"""Power iteration with deflation (PyHessian), shifted once the other end dominates.

    Runs are unshifted while each converges to an eigenvalue of the wanted sign (then the most
    wanted one left); a run that converges to one of the other sign is dropped and the rest
    run on :math:`H \pm |\lambda_u| I`. For ``which != "magnitude"`` one run is held in
    reserve for such an unwanted eigenvalue until it is found; each run gets an equal share
    of the remaining budget. Returns :class:`RitzPairs` sorted by ``which``.

    Holds the ``k`` eigenvectors, their sorted copy at the end, and three working vectors
    besides a product (:func:`~._memory.check_room` refuses a budget that does not), counted
    at the size ``span`` (default ``n``) of the operator whose block it searches, as the
    estimators count theirs: the blocks' searches together hold what one search would.
    """
    check_room("power iteration", 2 * k + 3, span or n, dtype, device)
    values: list[Tensor] = []
    found = torch.empty(n, k, dtype=dtype, device=device)  # the eigenvectors, as found
    residuals: list[Tensor] = []
    converged = True
    remaining = max_matvecs
    shift = 0.0
    reserve = which != "magnitude"  # a run for an eigenvalue of the other sign, if it dominates
    sign = -1.0 if which == "smallest" else 1.0
    while len(values) < k:
        before = found[:, : len(values)]
        iterations = remaining // (k - len(values) + reserve)
        v = gaussian(gen, (n,), dtype, device)
        theta_prev = None
        done = False
        for _ in range(iterations):
            if values:
                v = v - before @ (before.T @ v)
            v = v / v.norm()
            Hv = (yield v[:, None])[:, 0]
            remaining -= 1
            theta = v @ Hv
            pair = (theta, v, (Hv - theta * v).norm())
            if theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta_prev):
                done = True
                break
            theta_prev = theta
            w = Hv - shift * v
            norm = w.norm()
            if norm == 0:  # v spans a null direction of H - shift I: an exact eigenvector
                done = True
                break
            v = w / norm
        if reserve and sign * float(pair[0]) < 0:
            reserve = False  # the other end dominates: shift it below the wanted end
            shift = -sign * abs(float(pair[0]))
            continue
        converged = converged and done
        found[:, len(values)] = pair[1]
        values.append(pair[0])
        residuals.append(pair[2])
    order = wanted_order(torch.stack(values), which)
    return RitzPairs(
        torch.stack(values)[order], found[:, order], torch.stack(residuals)[order], converged
    )


def check_k(fname: str, k: int, size: int, what: str) -> None:
    """Refuse more eigenpairs than the problem's size."""
    if k > size:
        raise ValueError(f"{fname}: k must be at most {what}={size}; got k={k}.")


def warn_not_converged(
    fname: str,
    what: str,
    method: str,
    tol: float,
    budget: int,
    stacklevel: int = 3,
    *,
    stalled: bool = False,
) -> None:
    """Warn that ``what`` did not converge, at the caller of the public function ``fname``.

    ``stalled``: Lanczos stopped with products left because its explicit residuals no longer
    improved (:attr:`RitzPairs.stalled`): the rounding of the products, not the budget,
    limits them.
    """
    criterion = "relative residual" if method == "lanczos" else "relative eigenvalue change"
    if stalled:
        message = (
            f"{fname}: {what} did not reach tol={tol:g} ({criterion}) within "
            f"max_matvecs={budget}: the explicit residuals stopped improving, limited "
            "by the rounding of the Hessian-vector products in this precision; the results are "
            "the best found (converged=False, with their residuals). Pass a larger tol, or "
            "compute in float64."
        )
    else:
        message = (
            f"{fname}: {what} did not reach tol={tol:g} ({criterion}) within "
            f"max_matvecs={budget}; the results are the best found (converged=False). Raise "
            "max_matvecs or tol."
        )
    warnings.warn(message, RuntimeWarning, stacklevel)


def model_eigenpairs(
    fname: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Any,
    groups: object,
    generator: torch.Generator | None,
    options: dict[str, Any],
    solver: tuple[str, int, str, float, int],
) -> EigenResult | dict[str, EigenResult]:
    """Eigenpairs of a model's loss Hessian, or of each group's block, warning if unconverged.

    ``solver`` is ``(method, k, which, tol, budget)``, checked by the caller; the other
    arguments are those of :func:`._groups.run_model`.
    """
    method, k, which, tol, budget = solver
    reach = [0.0] if groups is not None else None  # the groups' largest |eigenvalue| seen

    def make_steps(
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        gen: torch.Generator,
        span: int,
        gradient: Callable[[], Tensor | None],
        group: object,
    ) -> Steps:
        check_k(fname, k, n, "P" if group is None else f"the size of group {group!r}")
        return eigen_steps(
            method, n, k, which, tol, budget, dtype, device, gen, gradient, reach, span=span
        )

    stalled_results: list[EigenResult] = []  # stopped by rounding, not by the budget

    def finish(pairs: RitzPairs, count: int, group_params: list[Tensor]) -> EigenResult:
        vectors = unflatten(pairs.vectors.T, group_params)
        result = EigenResult(pairs.values, vectors, pairs.residuals, pairs.converged, count)
        if pairs.stalled:
            stalled_results.append(result)
        return result

    results = run_model(
        fname,
        model,
        loss_fn,
        data,
        params,
        groups,
        generator,
        make_steps,
        finish,
        options,
        budget,
        certain=False,
    )
    if isinstance(results, dict):
        missing = [name for name, result in results.items() if not result.converged]
        if missing:
            listed = ", ".join(map(repr, missing))
            what = ("group " if len(missing) == 1 else "groups ") + listed
            stalled = all(any(results[n] is r for r in stalled_results) for n in missing)
            warn_not_converged(fname, what, method, tol, budget, 4, stalled=stalled)
    elif not results.converged:
        stalled = bool(stalled_results)
        warn_not_converged(fname, "the eigenpairs", method, tol, budget, 4, stalled=stalled)
    return results
