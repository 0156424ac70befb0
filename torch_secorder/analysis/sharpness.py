r"""Sharpness: the largest absolute eigenvalue of a Hessian, from products only.

The sharpness of a symmetric matrix :math:`H` is :math:`\max_i |\lambda_i(H)|`. Both functions
here find it with the library's thick-restart Lanczos
(:func:`~torch_secorder.analysis._lanczos.thick_restart_lanczos`, ``k=1``,
``which="magnitude"``), the algorithm of :func:`~torch_secorder.top_eigenvalues`, which stops
when the Ritz pair's relative residual is at most ``tol`` (see
:mod:`torch_secorder.analysis.eigen`). No matrix is formed: memory is the gradient graph and a
Lanczos basis of about 20 vectors of length :math:`P`, so the sharpness is available where
the :math:`P \times P` Hessian would not fit.

* :func:`output_sharpness` runs the model once on the batch, as
  :func:`~torch_secorder.output_hessian_matrix` does, and for each output element
  :math:`y_{k,o}` builds its differentiable gradient from that pass (one backward pass) and
  runs Lanczos on :math:`v \mapsto H_{k,o} v`: one gradient plus the Lanczos products per
  element, :math:`b\,|out|` Lanczos runs in all (typically 5 to 30 products each), instead of
  the :math:`b\,|out|\,P` products of the dense Hessians.
* :func:`model_sharpness` runs Lanczos on the Hessian of the mean loss over a data set
  (:meth:`HessianOperator.from_model <torch_secorder.HessianOperator.from_model>`), as
  :func:`~torch_secorder.model_top_eigenvalues` with ``k=1, which="magnitude"`` does, per
  group with ``groups=``.

The Lanczos method and its references are those of :mod:`torch_secorder.analysis.eigen`.
"""

from typing import Any

import torch
from torch import nn

from torch_secorder._checks import check_generator, check_int, check_positive
from torch_secorder._docstrings import shared_arguments
from torch_secorder._types import ParamSelection
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._eigensolvers import (
    default_max_matvecs,
    model_eigenpairs,
    warn_not_converged,
)
from torch_secorder.analysis._lanczos import RitzPairs, thick_restart_lanczos
from torch_secorder.analysis._sampling import make_generator, spawn
from torch_secorder.analysis._variables import model_selection
from torch_secorder.analysis.results import EigenResult, SharpnessResult
from torch_secorder.core.operator import objective_operator
from torch_secorder.core.output import model_outputs, select_outputs

__all__ = ["model_sharpness", "output_sharpness"]


@shared_arguments
def output_sharpness(
    model: nn.Module,
    inputs: object,
    *,
    params: ParamSelection = None,
    batched: bool = True,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    r"""Compute the sharpness of the Hessian of every output element of a model, matrix-free.

    For outputs :math:`y = m_\theta(x)` of shape ``(b, *out)``, entry ``[k, o]`` of the result
    is :math:`\max_i |\lambda_i(H_{k,o})|` for :math:`H_{k,o} = \nabla^2_\theta\, y_{k,o}`, the
    Hessian that :func:`~torch_secorder.output_hessian_matrix` returns at ``[k, o]``. The model
    runs once; each element then costs one gradient of that pass and one Lanczos run on
    products with its Hessian (see :mod:`torch_secorder.analysis.sharpness`), and no
    :math:`P \times P` matrix is formed. The model's mode is used (train-mode dropout draws
    the masks of RNG seed ``0``) and, like its buffers, left as found.

    Args:
        {model_outputs}
        batched: Whether the output's leading dimension indexes samples; the result has the
            output's shape either way (none for a scalar output).
        tol: Relative residual tolerance of each Lanczos run (as for
            :func:`~torch_secorder.top_eigenvalues`).
        max_matvecs: Budget of products per output element; ``None`` means 300, the default of
            :func:`~torch_secorder.top_eigenvalues` for one eigenvalue.
        generator: Source of the random starting vectors (each element draws from its own
            generator derived from it, in order); ``None`` uses a private generator with a
            fixed seed, the global RNG is never touched.

    Returns:
        A :class:`~torch_secorder.SharpnessResult` whose tensors have the output's shape:
        ``sharpness``, the signed ``eigenvalues`` of largest magnitude, their ``residuals``
        and ``converged`` flags, and ``num_matvecs``, the products of all elements together.

    Raises:
        TypeError: If ``model`` is not a module or returns no tensor, or an argument has the
            wrong type.
        ValueError: If the selection matches nothing, the parameters differ in dtype or
            device, the output is not floating point, or ``tol`` or ``max_matvecs`` is out
            of range.

    Warns:
        RuntimeWarning: If some output element's run did not converge within the budget.

    Example:
        >>> import torch
        >>> from torch_secorder import output_sharpness
        >>> model = torch.nn.Sequential(  # y = w2 * w1 * x: H = [[0, x], [x, 0]]
        ...     torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        ... ).double()
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> result = output_sharpness(model, x)
        >>> result.sharpness.round(decimals=10)  # |eigenvalues| of H: |x|
        tensor([[1.],
                [2.]], dtype=torch.float64)
        >>> bool(result.converged.all()), result.num_matvecs > 0
        (True, True)
    """
    fname = "output_sharpness"
    names, tensors = select_outputs(fname, model, inputs, params, batched)
    tol, budget = _check_options(fname, tol, max_matvecs, generator)
    base = make_generator(generator)
    size = sum(p.numel() for p in tensors)
    dtype, device = tensors[0].dtype, tensors[0].device
    pairs: list[RitzPairs] = []
    used = 0
    with model_outputs(fname, model, inputs, names, tensors, batched) as outputs:
        for index, gen in enumerate(spawn(base, outputs.numel)):
            steps = thick_restart_lanczos(size, 1, "magnitude", tol, budget, dtype, device, gen)
            problem = Problem(steps, budget=budget, certain=False)
            with objective_operator(fname, outputs.objective(index)) as operator:
                run(fname, operator, [problem])
            pairs.append(problem.result)
            used += problem.num_matvecs
        shape = outputs.shape
    empty = tensors[0].new_zeros(0)  # an output without elements
    values = torch.stack([p.values[0] for p in pairs]) if pairs else empty
    residuals = torch.stack([p.residuals[0] for p in pairs]) if pairs else empty
    converged = torch.tensor([p.converged for p in pairs], dtype=torch.bool, device=device)
    missing = int((~converged).sum())
    if missing:
        what = f"{missing} of {converged.numel()} output elements"
        stalled = all(p.stalled for p in pairs if not p.converged)
        warn_not_converged(fname, what, "lanczos", tol, budget, stalled=stalled)
    values, residuals, converged = (t.reshape(shape) for t in (values, residuals, converged))
    return SharpnessResult(values.abs(), values, residuals, converged, used)


@shared_arguments
def model_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: ParamSelection = None,
    groups: object = None,
    wrt: str = "params",
    modules: ParamSelection = None,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = False,
) -> EigenResult | dict[str, EigenResult]:
    r"""Compute the sharpness of the Hessian of a model's mean loss over a data set.

    Returns the eigenpair of largest magnitude :math:`\lambda` of
    :math:`H = \nabla^2_\theta \frac1N \sum_n \ell_n`, the operator of
    :meth:`HessianOperator.from_model <torch_secorder.HessianOperator.from_model>`, found by
    Lanczos on products only; the sharpness is :math:`|\lambda|`. This is
    :func:`~torch_secorder.model_top_eigenvalues` with ``k=1, which="magnitude"``; with
    ``groups``, each group's diagonal block is analysed, all groups together.

    Args:
        {model_data}
        {model_wrt}
        tol: Relative residual tolerance (as for :func:`~torch_secorder.top_eigenvalues`).
        max_matvecs: Budget of products per group; ``None`` means 300.
        {model_run}

    Returns:
        An :class:`~torch_secorder.EigenResult` with one eigenpair: ``eigenvalues`` holds
        :math:`\lambda` with its sign (the sharpness is ``result.eigenvalues.abs()[0]``), the
        unit eigenvector like the parameters with a leading 1, its residual, the convergence
        flag and the products used; a dict group name -> result with ``groups``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``tol`` or ``max_matvecs`` is out of range, a selection or group
            pattern matches nothing, the data are empty, or their passes differ (a
            shuffling ``DataLoader``).

    Warns:
        RuntimeWarning: If the run (of some group) did not converge within the budget.

    Example:
        >>> import torch
        >>> from torch_secorder import model_sharpness
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> result = model_sharpness(model, torch.nn.MSELoss(), (x, y))
        >>> result.eigenvalues.round(decimals=10)  # H = 2/N x^T x = diag(1, 4)
        tensor([4.], dtype=torch.float64)
    """
    fname = "model_sharpness"
    tol, budget = _check_options(fname, tol, max_matvecs, generator)
    params = model_selection(fname, params, wrt, modules, groups)
    options = {"seed": seed, "distributed": distributed, "progress": progress}
    solver = ("lanczos", 1, "magnitude", tol, budget)
    return model_eigenpairs(fname, model, loss_fn, data, params, groups, generator, options, solver)


def _check_options(
    fname: str, tol: object, max_matvecs: object, generator: object
) -> tuple[float, int]:
    """Validate the Lanczos options; return ``tol`` and the budget per run."""
    tol = check_positive(fname, "tol", tol)
    check_generator(fname, generator)
    if max_matvecs is None:
        return tol, default_max_matvecs("lanczos", 1, "magnitude")
    return tol, check_int(fname, "max_matvecs", max_matvecs, 1)
