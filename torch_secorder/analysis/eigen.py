r"""Extreme eigenpairs of the Hessian: thick-restart Lanczos, and power iteration for comparison.

``method="lanczos"`` (default) runs :func:`~torch_secorder.analysis._lanczos.thick_restart_lanczos`
until every wanted Ritz pair has a relative residual

.. math:: \frac{\|Hx - \theta x\|}{\max(|\theta|,\ \varepsilon^{1/3}\|H\|)} \le \texttt{tol},

where :math:`\varepsilon` is the dtype's machine epsilon and :math:`\|H\|` is estimated by the
largest Ritz value magnitude seen. It starts from a random vector, or, where the operator
keeps the loss gradient (a closure, a model's lone batch on one process) and the wanted end is
not the smallest, from the gradient's direction plus a random unit vector: a network's loss
gradient lies largely in the top eigenspace of its Hessian (Gur-Ari et al. 2018), and the
random half keeps every eigenspace in the Krylov space.

The residuals reported, and ``converged``, are explicit: :math:`\|Hx - \theta x\|` for the
normalised vector :math:`x` and its Rayleigh quotient :math:`\theta` (what a user
recomputing it would find), from the basis's products kept beside it where they fit, else
from one more product per returned pair; not the estimate of the Lanczos recurrence, which
drifts in finite precision (a basis spanning the whole space needs no check: its pairs are
exact to rounding). Since
:math:`|\lambda - \theta| \le \|Hx - \theta x\|` for a unit :math:`x`, the eigenvalue is
then accurate to ``tol`` relative; eigenvalues smaller
than :math:`\varepsilon^{1/3}\|H\|` (about :math:`6 \cdot 10^{-6}\|H\|` in float64,
:math:`5 \cdot 10^{-3}\|H\|` in float32) are accurate to ``tol`` times that floor. With
``groups=``, a group's floor is also at least :math:`\sqrt{\varepsilon}` times the largest
eigenvalue of all groups' blocks (their products round relative to the whole Hessian): a
block of rounding noise converges as zero.

``method="power"`` is power iteration with deflation as in PyHessian: each eigenpair starts
from a random vector, is orthogonalised against the pairs found, and stops when the Rayleigh
quotient changes by at most ``tol`` relative (:math:`|\theta_t - \theta_{t-1}| \le
\texttt{tol}\,|\theta_{t-1}|`). Power iteration converges to the eigenvalue of largest
magnitude. For ``which="largest"`` (``"smallest"``) the runs stay unshifted, as in PyHessian,
while each converges to a positive (negative) eigenvalue, which is then the most wanted one
left; a run that converges to an eigenvalue :math:`\lambda_u` of the other sign is dropped
and the remaining pairs come from :math:`H + |\lambda_u| I` (:math:`H - |\lambda_u| I`),
whose dominant eigenvalues are the wanted ones. (Shifting from the start would slow every
run: the ratios of consecutive eigenvalues move towards 1.)

Power iteration's test stops when the Rayleigh quotient stalls, which can be well before
it is accurate to ``tol``, and its ``converged`` says that it stalled, not that the pair is
an eigenpair: the residuals tell (two eigenvalues of equal magnitude and opposite sign, for
``which="magnitude"``, stall it between them); the products both methods took on trained
networks, and their errors, are in the benchmarks' README (``bench_analysis.py``).

References:
    Lanczos, C. (1950). An iteration method for the solution of the eigenvalue problem of
    linear differential and integral operators. J. Res. Nat. Bur. Standards 45(4), 255-282.
    https://doi.org/10.6028/jres.045.026

    Gur-Ari, G., Roberts, D. A. and Dyer, E. (2018). Gradient descent happens in a tiny
    subspace. arXiv:1812.04754.

    Wu, K. and Simon, H. (2000). Thick-restart Lanczos method for large symmetric eigenvalue
    problems. SIAM J. Matrix Anal. Appl. 22(2), 602-616.
    https://doi.org/10.1137/S0895479898334605

    Yao, Z., Gholami, A., Keutzer, K. and Mahoney, M. W. (2020). PyHessian: Neural networks
    through the lens of the Hessian. IEEE BigData 2020. arXiv:1912.07145.
"""

from typing import Any

import torch
from torch import nn

from torch_secorder._checks import (
    check_choice,
    check_generator,
    check_int,
    check_max_bytes,
    check_positive,
)
from torch_secorder._docstrings import shared_arguments
from torch_secorder._types import ParamSelection
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._eigensolvers import (
    check_k,
    default_max_matvecs,
    eigen_steps,
    model_eigenpairs,
    power_runs,
    warn_not_converged,
)
from torch_secorder.analysis._lanczos import WHICH, RitzPairs
from torch_secorder.analysis._memory import memory_budget
from torch_secorder.analysis._operator import resolve
from torch_secorder.analysis._sampling import make_generator
from torch_secorder.analysis._variables import model_selection
from torch_secorder.analysis.results import EigenResult
from torch_secorder.core.operator import kept_gradient

__all__ = ["model_top_eigenvalues", "top_eigenvalues"]

METHODS = ("lanczos", "power")


@shared_arguments
def top_eigenvalues(
    func_or_operator: Any,
    params: Any = None,
    *,
    k: int = 1,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    max_bytes: int | None = None,
) -> EigenResult:
    r"""Compute ``k`` extreme eigenvalues of the Hessian and their eigenvectors.

    Lanczos (default) needs fewer products than power iteration for the same accuracy, far
    fewer for several eigenpairs or close eigenvalues: it uses the whole Krylov space instead
    of its last vector (see :doc:`/algorithms` for both methods and their stopping rules).
    It starts from the loss gradient plus a random vector where the operator keeps the
    gradient (a closure; a :class:`HessianOperator` of one batch on one process) and
    ``which`` is not ``"smallest"``, else from a random vector.
    It keeps a basis of :math:`\max(20, 2k + 2)` vectors of size :math:`P`. For ``k > 1``,
    once the wanted pairs converge, it searches their orthogonal complement from a fresh random
    vector, so an exactly repeated eigenvalue is reported with all its copies (a single Krylov
    space holds only one of them).

    Args:
        {closure_or_operator}
        k: Number of eigenpairs, ``1 <= k <= P``.
        which: ``"largest"`` (algebraically), ``"smallest"`` (algebraically) or
            ``"magnitude"`` (largest :math:`|\lambda|`).
        method: ``"lanczos"`` (thick-restart Lanczos, reorthogonalised) or
            ``"power"`` (power iteration with deflation, as PyHessian).
        tol: Lanczos: relative residual tolerance; power: relative change of the eigenvalue
            between iterations.
        max_matvecs: Budget of Hessian-vector products; ``None`` means :math:`100k + 200` for
            Lanczos and 100 per eigenpair (plus one run for ``which != "magnitude"``) for power
            iteration. Lanczos needs at least ``k``, power iteration two per run.
        generator: Source of the random starting vectors; ``None`` uses a private generator
            with a fixed seed (reproducible), the global RNG is never touched.
        {max_bytes}

    Returns:
        An :class:`EigenResult`: eigenvalues sorted by ``which`` (descending, ascending or by
        descending magnitude), unit eigenvectors (a list like params with a leading ``k`` for
        a closure, ``(P, k)`` columns for an operator; each with its entry of largest
        magnitude positive, so that the sign does not depend on rounding), residual norms
        :math:`\|Hx - \lambda x\|`, the convergence flag and the products used.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``k`` is not in ``[1, P]``, ``which`` or ``method`` is unknown,
            ``max_matvecs`` is too small, or the operator is not square or not symmetric.

    Warns:
        RuntimeWarning: If the budget ran out before every pair converged (``converged`` is
            then ``False``).

    Example:
        >>> import torch
        >>> from torch_secorder import top_eigenvalues
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, -4.0, 3.0], dtype=torch.float64)
        >>> result = top_eigenvalues(lambda: 0.5 * (d * x**2).sum(), [x], k=2, which="magnitude")
        >>> result.eigenvalues.round(decimals=10), result.converged
        (tensor([-4.,  3.], dtype=torch.float64), True)
        >>> result.eigenvectors[0].abs().round(decimals=10)
        tensor([[0., 1., 0.],
                [0., 0., 1.]], dtype=torch.float64)
    """
    fname = "top_eigenvalues"
    max_bytes = check_max_bytes(fname, max_bytes, optional=True)
    with memory_budget(fname, max_bytes):
        k, tol, budget = _check_options(fname, k, which, method, tol, max_matvecs, generator)
        target = resolve(fname, func_or_operator, params)
        check_k(fname, k, target.size, "P")
        with target.open() as operator:
            steps = eigen_steps(
                method,
                target.size,
                k,
                which,
                tol,
                budget,
                target.dtype,
                target.device,
                make_generator(generator),
                lambda: kept_gradient(operator),
            )
            problem = Problem(steps, budget=budget, certain=False)
            run(fname, operator, [problem])
        pairs: RitzPairs = problem.result
        if not pairs.converged:
            warn_not_converged(fname, "the eigenpairs", method, tol, budget, stalled=pairs.stalled)
        return EigenResult(
            pairs.values,
            target.columns_like_params(pairs.vectors),
            pairs.residuals,
            pairs.converged,
            problem.num_matvecs,
        )


@shared_arguments
def model_top_eigenvalues(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: ParamSelection = None,
    groups: object = None,
    wrt: str = "params",
    modules: ParamSelection = None,
    k: int = 1,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = False,
    max_bytes: int | None = None,
) -> EigenResult | dict[str, EigenResult]:
    r"""Compute extreme eigenpairs of the Hessian of a model's mean loss over a data set.

    The operator is :meth:`HessianOperator.from_model(model, loss_fn, data, params=params)
    <torch_secorder.HessianOperator.from_model>`. With ``groups``, each group's diagonal block
    :math:`H_{gg}` is analysed; all groups advance together, each step's vectors of all groups
    going to the operator in memory-bounded chunks (see :func:`model_hessian_trace`). Each
    group's product is a full Hessian-vector product: :math:`G` groups cost the sum of their
    products, up to :math:`G` times ``max_matvecs``.

    Args:
        {model_data}
        {model_wrt}
        k: Eigenpairs per group, at most the group's size.
        which: As for :func:`top_eigenvalues`.
        method: As for :func:`top_eigenvalues`.
        tol: As for :func:`top_eigenvalues`.
        max_matvecs: Budget per group, as for :func:`top_eigenvalues`.
        {model_run}
        {max_bytes}

    Returns:
        An :class:`EigenResult` (eigenvectors like the group's parameters, with a leading
        ``k``), or a dict group name -> :class:`EigenResult`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: On bad options (as for :func:`top_eigenvalues`), ``k`` larger than a
            group, a selection or group pattern matching nothing, empty data, or data whose
            passes differ (a shuffling ``DataLoader``).

    Warns:
        RuntimeWarning: If some pair of some group did not converge within the budget.

    Example:
        >>> import torch
        >>> from torch_secorder import model_top_eigenvalues
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> result = model_top_eigenvalues(model, torch.nn.MSELoss(), (x, y), k=2)
        >>> result.eigenvalues.round(decimals=10)  # H = 2/N x^T x = diag(1, 4)
        tensor([4., 1.], dtype=torch.float64)
    """
    fname = "model_top_eigenvalues"
    max_bytes = check_max_bytes(fname, max_bytes, optional=True)
    with memory_budget(fname, max_bytes):
        k, tol, budget = _check_options(fname, k, which, method, tol, max_matvecs, generator)
        params = model_selection(fname, params, wrt, modules, groups)
        options = {"seed": seed, "distributed": distributed, "progress": progress}
        solver = (method, k, which, tol, budget)
        return model_eigenpairs(
            fname, model, loss_fn, data, params, groups, generator, options, solver
        )


def _check_options(
    fname: str,
    k: object,
    which: object,
    method: object,
    tol: object,
    max_matvecs: object,
    generator: object,
) -> tuple[int, float, int]:
    """Validate the options; return ``k``, ``tol`` and the budget (Python numbers)."""
    k = check_int(fname, "k", k, 1)
    check_choice(fname, "which", which, WHICH)
    check_choice(fname, "method", method, METHODS)
    tol = check_positive(fname, "tol", tol)
    check_generator(fname, generator)
    if max_matvecs is None:
        return k, tol, default_max_matvecs(method, k, which)  # type: ignore[arg-type]
    if method == "lanczos":
        why = f"Lanczos needs k={k} products"
        return k, tol, check_int(fname, "max_matvecs", max_matvecs, k, why)
    runs = power_runs(k, which)  # type: ignore[arg-type]
    why = f"power iteration needs 2 per run, {runs} runs"
    return k, tol, check_int(fname, "max_matvecs", max_matvecs, 2 * runs, why)
