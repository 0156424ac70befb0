r"""The eigen-solvers of :func:`~torch_secorder.top_eigenvalues` as product-requesting generators.

Power iteration with deflation lives here, thick-restart Lanczos in :mod:`._lanczos`;
:func:`eigen_steps` picks one by name and :func:`default_max_matvecs` gives their default
budgets. The methods and their stopping rules are described in
:mod:`torch_secorder.analysis.eigen`, which holds the public functions.
"""

import torch
from torch import Tensor

from torch_secorder.analysis._driver import Steps
from torch_secorder.analysis._lanczos import RitzPairs, thick_restart_lanczos, wanted_order
from torch_secorder.analysis._sampling import gaussian

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
) -> Steps:
    """The eigen-solver ``method`` as a product-requesting generator returning RitzPairs."""
    if method == "lanczos":
        return thick_restart_lanczos(n, k, which, tol, budget, dtype, device, gen)
    return power_iteration(n, k, which, tol, budget, dtype, device, gen)


def power_iteration(
    n: int,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
) -> Steps:
    r"""Power iteration with deflation (PyHessian), shifted once the other end dominates.

    Runs are unshifted while each converges to an eigenvalue of the wanted sign (then the most
    wanted one left); a run that converges to one of the other sign is dropped and the rest
    run on :math:`H \pm |\lambda_u| I`. For ``which != "magnitude"`` one run is held in
    reserve for such an unwanted eigenvalue until it is found; each run gets an equal share
    of the remaining budget. Returns :class:`RitzPairs` sorted by ``which``.
    """
    values: list[Tensor] = []
    vectors: list[Tensor] = []
    residuals: list[Tensor] = []
    converged = True
    remaining = max_matvecs
    shift = 0.0
    reserve = which != "magnitude"  # a run for an eigenvalue of the other sign, if it dominates
    sign = -1.0 if which == "smallest" else 1.0
    while len(values) < k:
        found = torch.stack(vectors, dim=1) if vectors else None
        iterations = remaining // (k - len(values) + reserve)
        v = gaussian(gen, (n,), dtype, device)
        theta_prev = None
        done = False
        for _ in range(iterations):
            if found is not None:
                v = v - found @ (found.T @ v)
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
        values.append(pair[0])
        vectors.append(pair[1])
        residuals.append(pair[2])
    order = wanted_order(torch.stack(values), which)
    return RitzPairs(
        torch.stack(values)[order],
        torch.stack(vectors, dim=1)[:, order],
        torch.stack(residuals)[order],
        converged,
    )
