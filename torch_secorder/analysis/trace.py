r"""The trace of the Hessian: Hutchinson, Hutch++, XTrace and exact.

With :math:`m` products and Rademacher probes :math:`z` (:math:`\mathbb E\, zz^\top = I`):

* **Hutchinson**: :math:`\frac1m \sum_i z_i^\top H z_i`, unbiased, variance
  :math:`2\|H\|_F^2 - 2\sum_j H_{jj}^2` per probe.
* **Hutch++**: a third of the products sketch :math:`Q = \operatorname{orth}(HS)`, a third give
  :math:`\operatorname{tr}(Q^\top H Q)` exactly, the rest estimate the trace of the deflated
  :math:`(I - QQ^\top) H (I - QQ^\top)` by Hutchinson; the error falls like :math:`1/m`
  instead of :math:`1/\sqrt m` when a few eigenvalues dominate. When many eigenvalues are
  comparable and the diagonal carries most of the trace, plain Hutchinson, which spends every
  product on probes, can be the more accurate.
* **XTrace**: half the products sketch :math:`Y = H\Omega`, half give :math:`HQ`; every probe
  :math:`\omega_i` is used both in the sketch and, leaving it out of the sketch
  (:math:`Q_{(i)} = \operatorname{orth}(Y_{-i})`), as a Hutchinson probe of the deflated rest:
  :math:`t_i = \operatorname{tr}(Q_{(i)}^\top H Q_{(i)}) + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top)
  H (I - Q_{(i)}Q_{(i)}^\top) \omega_i`. The estimate is the mean :math:`\bar t` of the
  :math:`s = m/2` exchangeable :math:`t_i`; all leave-one-out bases come from one QR
  factorisation. Its standard error is the jackknife's over the test vectors,
  :math:`\sqrt{\tfrac{s-1}{s}\sum_k (\bar t_{(k)} - \bar t_{(\cdot)})^2}` with
  :math:`\bar t_{(k)}` the estimate without :math:`\omega_k` (its leave-two-out bases from
  the same factorisation, :math:`O(s^3)` in all). The :math:`t_i` share their sketches and
  are positively correlated, so their standard deviation over :math:`\sqrt s` (the paper's
  heuristic) understated the error: over 200 seeds the errors spread 1.06 to 1.34 times as
  wide on small networks and 1.2 to 1.65 times on test spectra, 80 to 94%
  of them within two standard errors. The jackknife errs the other way, as it must (Efron
  and Stein 1981): there the errors spread 0.47 to 0.97 times as wide as it says, 95 to 100%
  within two standard errors. Hutchinson's and Hutch++'s standard errors are those of means
  of independent samples (given Hutch++'s sketch, its error is its probes'): from few probes
  they are rough, the error over them spread like Student's t with one degree of freedom
  fewer than probes, or wider where a few directions dominate the rest (Hutch++ of 10
  products has 4 probes: on a small MLP 12% of its errors exceeded three standard errors; at
  100 products, 34 probes).
* **Exact**: the sum of the exact diagonal (:meth:`HessianOperator.diagonal
  <torch_secorder.HessianOperator.diagonal>`): :math:`P` unit-vector products for a closure
  or an operator without ``diagonal``, fewer for a model whose layers' structure gives their
  diagonal exactly (:func:`~torch_secorder.model_hessian_diagonal`).
* **Auto** (the default): the exact trace when its planned products are at most the
  budget, else Hutch++ (:mod:`._exact`); the result names the method used.

References:
    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines. Comm. Statist. Simulation Comput. 18(3), 1059-1076.
    https://doi.org/10.1080/03610918908812806

    Meyer, R. A., Musco, C., Musco, C. and Woodruff, D. P. (2021). Hutch++: Optimal stochastic
    trace estimation. SOSA 2021, 142-155. arXiv:2010.09649.

    Epperly, E. N., Tropp, J. A. and Webber, R. J. (2024). XTrace: Making the most of every
    sample in stochastic trace estimation. SIAM J. Matrix Anal. Appl. 45(1), 1-23.
    arXiv:2301.07825.

    Efron, B. and Stein, C. (1981). The jackknife estimate of variance. Ann. Statist. 9(3),
    586-596. https://doi.org/10.1214/aos/1176345462
"""

import math
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_estimator, check_max_bytes
from torch_secorder._docstrings import shared_arguments
from torch_secorder._types import ParamSelection
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._estimators import estimator_maker, estimator_steps
from torch_secorder.analysis._exact import auto_method, model_exact_or_estimate
from torch_secorder.analysis._groups import run_model
from torch_secorder.analysis._memory import check_diagonal_room, memory_budget
from torch_secorder.analysis._operator import resolve
from torch_secorder.analysis._variables import model_selection
from torch_secorder.analysis.results import TraceEstimate
from torch_secorder.core.operator import HessianOperator

__all__ = ["hessian_trace", "model_hessian_trace"]

NEEDS = {
    "auto": (3, "Hutch++ where the exact trace costs more: a sketch, its projection and a probe"),
    "hutch++": (3, "a sketch, its projection and a Hutchinson probe"),
    "hutchinson": (1, "one probe"),
    "xtrace": (2, "one probe and its projection"),
    "exact": (1, "it uses P products regardless"),
}
"""Every method, with the fewest products it runs with and why."""
METHODS = tuple(NEEDS)


@shared_arguments
def hessian_trace(
    func_or_operator: Any,
    params: Any = None,
    *,
    method: str = "auto",
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    max_bytes: int | None = None,
) -> TraceEstimate:
    r"""Estimate the trace of the Hessian, :math:`\operatorname{tr}(H) = \sum_i \lambda_i`.

    Vectors go to the operator in chunks of at most 1 GiB (or a sixteenth of ``max_bytes``).
    Hutchinson, Hutch++ and ``"exact"`` draw their vectors chunk by chunk; Hutch++ keeps its
    sketch of :math:`m/3` vectors of size :math:`P`, XTrace five blocks of :math:`m/2`, fewer
    where ``max_bytes`` is short (the memory model is in :doc:`/scaling`). See
    :doc:`/algorithms` for the estimators.

    Args:
        {closure_or_operator}
        method: ``"auto"`` (default: ``"exact"`` where that costs at most ``num_matvecs``
            products, else ``"hutch++"``), ``"hutch++"``, ``"hutchinson"`` (Rademacher
            probes), ``"xtrace"`` or ``"exact"``.
        num_matvecs: Budget of Hessian-vector products: Hutchinson uses exactly this many
            (at least 1), Hutch++ (at least 3) and XTrace (at least 2) at most this many.
            ``"exact"`` ignores it: it takes the products of the exact diagonal, :math:`P`
            or, for an operator over a model's data, fewer where layer structure allows.
        generator: Source of the random probes; ``None`` uses a private generator with a fixed
            seed (reproducible), the global RNG is never touched.
        {max_bytes}

    Returns:
        A :class:`TraceEstimate` with the value and standard error as 0-d tensors (stderr
        ``0`` for ``"exact"``; ``nan`` when a single Hutchinson term leaves it undefined) and
        the method used.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``method`` is unknown, ``num_matvecs`` is too small for it, the operator
            is not square, or it turns out not to be symmetric.

    Warns:
        RuntimeWarning: If ``max_bytes`` leaves XTrace fewer products than ``num_matvecs``.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_trace
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> est = hessian_trace(lambda: 0.5 * (d * x**2).sum(), [x], method="hutchinson",
        ...                     num_matvecs=4)
        >>> est.value, est.stderr, est.num_matvecs  # exact for a diagonal Hessian
        (tensor(6., dtype=torch.float64), tensor(0., dtype=torch.float64), 4)
    """
    fname = "hessian_trace"
    max_bytes = check_max_bytes(fname, max_bytes, optional=True)
    with memory_budget(fname, max_bytes):
        num_matvecs = check_estimator(fname, method, num_matvecs, generator, NEEDS)
        target = resolve(fname, func_or_operator, params)
        if method in ("auto", "exact"):
            check_diagonal_room(method == "exact", target.size, target.dtype, target.device)
        with target.open() as operator:
            if method == "auto":
                method = auto_method(target, num_matvecs, "hutch++")
            if method == "exact" and isinstance(operator, HessianOperator):
                before = operator.num_matvecs
                value = operator.diagonal().sum()
                count = operator.num_matvecs - before
                return TraceEstimate(value, torch.zeros_like(value), count, method)
            steps = estimator_steps(
                method, target.size, num_matvecs, target.dtype, target.device, generator
            )
            problem = Problem(steps, budget=num_matvecs)
            run(fname, operator, [problem])
        value, stderr = problem.result
        return TraceEstimate(value, stderr, problem.num_matvecs, method)


@shared_arguments
def model_hessian_trace(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: ParamSelection = None,
    groups: object = None,
    wrt: str = "params",
    modules: ParamSelection = None,
    method: str = "auto",
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = False,
    max_bytes: int | None = None,
) -> TraceEstimate | dict[str, TraceEstimate]:
    r"""Estimate the trace of the Hessian of a model's mean loss over a data set.

    The operator is :meth:`HessianOperator.from_model(model, loss_fn, data, params=params)
    <torch_secorder.HessianOperator.from_model>`. With ``groups``, each group's trace
    :math:`\operatorname{tr}(H_{gg})` is estimated, all groups advancing together: each step's
    probes of all groups, zero-padded outside their blocks, go to the operator in chunks of
    at most 1 GiB of full-length columns, one pass over the data per chunk. Each group's
    product is a full Hessian-vector product, so :math:`G` groups cost :math:`G` times the
    products of one estimate (``num_matvecs`` is per group, and each result counts its own);
    memory stays that of one estimate of the whole selection plus one chunk.

    Args:
        {model_data}
        {model_wrt}
        method: As for :func:`hessian_trace`.
        num_matvecs: Budget per group, as for :func:`hessian_trace`.
        {model_run}
        {max_bytes}

    Returns:
        A :class:`TraceEstimate`, or a dict group name -> :class:`TraceEstimate`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: On an unknown method or group kind, a too small budget, a selection or
            group pattern matching nothing, empty data, or data whose passes differ (a
            shuffling ``DataLoader``).

    Example:
        >>> import torch
        >>> from torch_secorder import model_hessian_trace
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> traces = model_hessian_trace(model, torch.nn.MSELoss(), (x, y), groups="parameter",
        ...                              method="exact")
        >>> {name: float(t.value) for name, t in traces.items()}  # 2/N sum x^2, 2/N N
        {'weight': 30.0, 'bias': 2.0}
    """
    fname = "model_hessian_trace"
    max_bytes = check_max_bytes(fname, max_bytes, optional=True)
    with memory_budget(fname, max_bytes):
        num_matvecs = check_estimator(fname, method, num_matvecs, generator, NEEDS)
        params = model_selection(fname, params, wrt, modules, groups)
        options = {"seed": seed, "distributed": distributed, "progress": progress}
        estimator = "hutch++" if method in ("auto", "exact") else method

        make_steps = estimator_maker(estimator, num_matvecs)

        def finish(result: tuple[Tensor, Tensor], count: int, _: list[Tensor]) -> TraceEstimate:
            return TraceEstimate(result[0], result[1], count, estimator)

        def estimate(selection: Any, subset: object) -> Any:
            return run_model(
                fname,
                model,
                loss_fn,
                data,
                selection,
                subset,
                generator,
                make_steps,
                finish,
                options,
                num_matvecs,
            )

        if method not in ("auto", "exact"):
            return estimate(params, groups)

        def exact(diagonal: list[Tensor], count: int) -> TraceEstimate:
            value = torch.stack([d.sum() for d in diagonal]).sum()
            return TraceEstimate(value, torch.zeros_like(value), count, "exact")

        budget = num_matvecs if method == "auto" else math.inf
        return model_exact_or_estimate(
            fname, model, loss_fn, data, params, groups, budget, options, exact, estimate
        )
