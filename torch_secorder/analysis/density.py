r"""The eigenvalue spectral density of the Hessian by stochastic Lanczos quadrature.

The spectral density :math:`\phi(t) = \frac1P \sum_i \delta(t - \lambda_i)` is smoothed with a
Gaussian :math:`g_\sigma` and estimated from random probes. For a unit probe :math:`v`,
:math:`v^\top g_\sigma(tI - H) v = \sum_i (v^\top q_i)^2 g_\sigma(t - \lambda_i)` has expectation
:math:`\phi_\sigma(t)` over uniformly random directions, and Lanczos from :math:`v` gives the
Gauss quadrature of that sum with nodes :math:`\theta_j` (Ritz values) and weights
:math:`\tau_j`. Averaging over :math:`m` probes,

.. math::
    \phi_\sigma(t) \approx \frac1m \sum_{l=1}^m \sum_{j=1}^s \tau_{lj}\,
    \frac{1}{\sqrt{2\pi}\sigma} e^{-(t - \theta_{lj})^2 / (2\sigma^2)} .

All probes run together, one batched product per Lanczos step, each reorthogonalised
against the vectors of its basis it keeps (memory: those vectors of size :math:`P`, at most
``steps`` per probe). A probe keeps its last vectors in 128 MiB (at least 3, those the
three-term recurrence needs: a ResNet-18's whole basis took several times the products' time
to reorthogonalise against; Gauss quadrature tolerates the orthogonality the older vectors
lose, Knizhnerman 1996); beyond 4 GiB or ``max_bytes`` the probes run in consecutive groups
that fit, and where not even one probe's vectors fit, each keeps fewer, at least 3. Extreme
Ritz values converge first, so the support's edges are resolved sharply; the interior is
resolved to about the node spacing, which sets the default broadening :math:`\sigma`.

References:
    Knizhnerman, L. A. (1996). The simple Lanczos procedure: estimates of the error of the
    Gauss quadrature formula and their applications. Comput. Math. Math. Phys. 36(11),
    1481-1492.

    Lin, L., Saad, Y. and Yang, C. (2016). Approximating spectral densities of large matrices.
    SIAM Review 58(1), 34-65. https://doi.org/10.1137/130934283

    Ubaru, S., Chen, J. and Saad, Y. (2017). Fast estimation of tr(f(A)) via stochastic
    Lanczos quadrature. SIAM J. Matrix Anal. Appl. 38(4), 1075-1099.
    https://doi.org/10.1137/16M1104974

    Ghorbani, B., Krishnan, S. and Xiao, Y. (2019). An investigation into neural net
    optimization via Hessian eigenvalue density. ICML 2019. arXiv:1901.10159.

    Golub, G. H. and Meurant, G. (2010). Matrices, Moments and Quadrature with Applications.
    Princeton University Press. https://doi.org/10.1515/9781400833887

    Yao, Z., Gholami, A., Keutzer, K. and Mahoney, M. W. (2020). PyHessian: Neural networks
    through the lens of the Hessian. IEEE BigData 2020. arXiv:1912.07145.
"""

import math
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_generator, check_int, check_max_bytes, check_positive
from torch_secorder._docstrings import shared_arguments
from torch_secorder._types import ParamSelection
from torch_secorder.analysis._driver import Problem, Steps, run
from torch_secorder.analysis._groups import run_model
from torch_secorder.analysis._lanczos import lanczos_quadrature
from torch_secorder.analysis._memory import memory_budget
from torch_secorder.analysis._operator import resolve
from torch_secorder.analysis._rows import work_dtype
from torch_secorder.analysis._sampling import make_generator
from torch_secorder.analysis._variables import model_selection
from torch_secorder.analysis.results import DensityResult

__all__ = ["model_spectral_density", "spectral_density"]

STEPS = 100
"""Default Lanczos steps per probe (PyHessian's ``iter=100``)."""

PROBE_ENTRIES = 2**16
r"""Default probes: the fewest, at most 4, with which ``probes`` times :math:`P` reaches this.
The relative variance of the density at a point falls as one over the probes times the
number of eigenvalues near it (Ubaru et al. 2017), which grows with :math:`P` at a given
share of the spectrum: 4 probes on small models, one from 65,536 parameters on (as Ghorbani
et al. 2019 and PyHessian take on networks), where products cost most."""

SIGMA_PER_STEP = 0.5
r"""Default broadening: :math:`\sigma` = ``SIGMA_PER_STEP`` times the node range over the steps."""


@shared_arguments
def spectral_density(
    func_or_operator: Any,
    params: Any = None,
    *,
    num_matvecs: int | None = None,
    num_probes: int | None = None,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    max_bytes: int | None = None,
) -> DensityResult:
    r"""Estimate the Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Runs ``num_probes`` Lanczos recurrences of ``steps = num_matvecs // num_probes`` steps
    each (at most :math:`P`; 100 by default), all probes in one batched product per step
    (in groups when their bases would exceed 4 GiB), and broadens the pooled Ritz nodes with
    Gaussians (see :doc:`/algorithms`).

    Args:
        {closure_or_operator}
        num_matvecs: Budget of Hessian-vector products, at least ``num_probes``; ``None``
            (default) means 100 steps per probe (PyHessian's ``iter=100``).
        num_probes: Number of random probes; ``None`` (default) means the fewest, at most 4
            and at most ``num_matvecs``, with ``num_probes`` times :math:`P` at least
            :math:`2^{16}` (the density's variance falls with both): 4 up to :math:`P` =
            21,845, one from 65,536 on.
        grid_size: Number of grid points (default 1000), at least 2.
        sigma: Standard deviation of the Gaussian broadening; ``None`` means half the range of
            the Ritz nodes divided by ``steps`` (about the quadrature's resolution). Below the
            grid's spacing the density is each grid cell's mean of the broadened one (the
            points would miss the Gaussians).
        generator: Source of the probes; ``None`` uses a private generator with a fixed seed
            (reproducible), the global RNG is never touched.
        {max_bytes}

    Returns:
        A :class:`DensityResult`: the grid spans the nodes padded by :math:`4\sigma` plus 1% of
        their range on each side; the density is non-negative with trapezoidal integral 1
        over the grid; nodes and weights per probe, ``(num_probes, steps)``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a budget or size is too small, ``sigma`` is not positive, or the
            operator is not square or not symmetric.

    Example:
        >>> import torch
        >>> from torch_secorder import spectral_density
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> result = spectral_density(lambda: 0.5 * (d * x**2).sum(), [x], num_probes=2)
        >>> result.nodes.round(decimals=10)  # 3 steps exhaust the space: exact eigenvalues
        tensor([[1., 2., 4.],
                [1., 2., 4.]], dtype=torch.float64)
        >>> float(torch.trapezoid(result.density, result.grid))
        1.0
    """
    fname = "spectral_density"
    max_bytes = check_max_bytes(fname, max_bytes, optional=True)
    with memory_budget(fname, max_bytes):
        num_matvecs, num_probes, grid_size, sigma = _check_options(
            fname, num_matvecs, num_probes, grid_size, sigma, generator
        )
        target = resolve(fname, func_or_operator, params)
        probes, steps = _plan(target.size, num_matvecs, num_probes)
        with target.open() as operator:
            problem = Problem(
                lanczos_quadrature(
                    target.size,
                    steps,
                    probes,
                    target.dtype,
                    target.device,
                    make_generator(generator),
                ),
                budget=steps * probes,
            )
            run(fname, operator, [problem])
        nodes, weights = problem.result
        return _density_result(nodes, weights, problem.num_matvecs, grid_size, sigma)


@shared_arguments
def model_spectral_density(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: ParamSelection = None,
    groups: object = None,
    wrt: str = "params",
    modules: ParamSelection = None,
    num_matvecs: int | None = None,
    num_probes: int | None = None,
    grid_size: int = 1000,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = False,
    max_bytes: int | None = None,
) -> DensityResult | dict[str, DensityResult]:
    r"""Estimate the eigenvalue density of the Hessian of a model's mean loss over a data set.

    The operator is :meth:`HessianOperator.from_model(model, loss_fn, data, params=params)
    <torch_secorder.HessianOperator.from_model>`. With ``groups``, each group's diagonal block
    :math:`H_{gg}` gets its own density; all groups' probes advance together, each Lanczos
    step's vectors of all groups going to the operator in memory-bounded chunks (see
    :func:`model_hessian_trace`). Each group's product is a full Hessian-vector product:
    :math:`G` groups cost :math:`G` times ``num_matvecs``.

    Args:
        {model_data}
        {model_wrt}
        num_matvecs: Budget per group, as for :func:`spectral_density`.
        num_probes: As for :func:`spectral_density` (by default from each group's size).
        grid_size: As for :func:`spectral_density`.
        sigma: As for :func:`spectral_density` (``None``: per group).
        {model_run}
        {max_bytes}

    Returns:
        A :class:`DensityResult`, or a dict group name -> :class:`DensityResult`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: On bad options (as for :func:`spectral_density`), a selection or group
            pattern matching nothing, empty data, or data whose passes differ (a shuffling
            ``DataLoader``).

    Example:
        >>> import torch
        >>> from torch_secorder import model_spectral_density
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> result = model_spectral_density(model, torch.nn.MSELoss(), (x, y), num_probes=1)
        >>> result.nodes.round(decimals=10)  # H = 2/N x^T x = diag(1, 4)
        tensor([[1., 4.]], dtype=torch.float64)
    """
    fname = "model_spectral_density"
    max_bytes = check_max_bytes(fname, max_bytes, optional=True)
    with memory_budget(fname, max_bytes):
        num_matvecs, num_probes, grid_size, sigma = _check_options(
            fname, num_matvecs, num_probes, grid_size, sigma, generator
        )
        params = model_selection(fname, params, wrt, modules, groups)

        def make_steps(
            n: int,
            dtype: torch.dtype,
            device: torch.device,
            gen: torch.Generator,
            span: int,
            _: object,
            __: object,
        ) -> Steps:
            probes, steps = _plan(n, num_matvecs, num_probes)
            return lanczos_quadrature(n, steps, probes, dtype, device, gen, span=span)

        def finish(result: tuple[Tensor, Tensor], count: int, _: list[Tensor]) -> DensityResult:
            return _density_result(result[0], result[1], count, grid_size, sigma)

        options = {"seed": seed, "distributed": distributed, "progress": progress}

        def budget(n: int) -> int:
            probes, steps = _plan(n, num_matvecs, num_probes)
            return probes * steps

        return run_model(
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
        )


def _check_options(
    fname: str,
    num_matvecs: object,
    num_probes: object,
    grid_size: object,
    sigma: object,
    generator: object,
) -> tuple[int | None, int | None, int, float | None]:
    """Validate the options; return ``num_matvecs``, ``num_probes``, ``grid_size``, ``sigma``."""
    if num_probes is not None:
        num_probes = check_int(fname, "num_probes", num_probes, 1)
    if num_matvecs is not None:
        why = f"one Lanczos step for each of num_probes={num_probes}" if num_probes else ""
        least: int = num_probes or 1  # type: ignore[assignment]
        num_matvecs = check_int(fname, "num_matvecs", num_matvecs, least, why)
    grid_size = check_int(fname, "grid_size", grid_size, 2)
    if sigma is not None:
        sigma = check_positive(fname, "sigma", sigma)
    check_generator(fname, generator)
    return num_matvecs, num_probes, grid_size, sigma  # type: ignore[return-value]


def _default_probes(n: int) -> int:
    """The default number of probes for an operator of size ``n`` (:data:`PROBE_ENTRIES`)."""
    return min(4, -(-PROBE_ENTRIES // n))


def _plan(n: int, num_matvecs: int | None, num_probes: int | None) -> tuple[int, int]:
    """Probes and Lanczos steps per probe for an operator of size ``n`` (see the defaults)."""
    probes = num_probes or min(_default_probes(n), num_matvecs or 4)
    return probes, (num_matvecs or STEPS * probes) // probes


def _default_sigma(nodes: Tensor) -> float:
    """Half the range of the nodes per Lanczos step (a nonzero fallback for a point spectrum)."""
    low, high = float(nodes.min()), float(nodes.max())
    return SIGMA_PER_STEP * _span(low, high) / nodes.shape[1]


def _span(low: float, high: float) -> float:
    span = high - low
    if span > 0:
        return span
    return 1e-2 * max(abs(low), abs(high)) or 1.0


def _density_result(
    nodes: Tensor, weights: Tensor, num_matvecs: int, grid_size: int, sigma: float | None
) -> DensityResult:
    """Broaden Ritz nodes and weights into a density on a grid integrating to 1.

    The Gaussians' values at the grid points; where ``sigma`` is below the grid's spacing
    :math:`h` (the points would miss them), their means over each point's cell of width
    :math:`h` instead, which keep every node's mass.
    """
    sigma = _default_sigma(nodes) if sigma is None else float(sigma)
    low, high = float(nodes.min()), float(nodes.max())
    pad = 4 * sigma + 0.01 * _span(low, high)
    work = work_dtype(nodes.device, nodes.dtype)
    grid = torch.linspace(low - pad, high + pad, grid_size, dtype=work, device=nodes.device)
    centres = nodes.reshape(-1).to(work)
    mass = weights.reshape(-1).to(work) / nodes.shape[0]
    density = torch.zeros_like(grid)
    spacing = (2 * pad + high - low) / max(1, grid_size - 1)
    chunk = max(1, 2**24 // max(1, centres.numel()))
    for start in range(0, grid_size, chunk):
        t = grid[start : start + chunk, None]
        if sigma >= spacing:
            z = (t - centres) / sigma
            kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        else:
            upper, lower = ((t + edge - centres) / sigma for edge in (spacing / 2, -spacing / 2))
            kernel = (torch.special.ndtr(upper) - torch.special.ndtr(lower)) / spacing
        density[start : start + chunk] = kernel @ mass
    density = density / torch.trapezoid(density, grid)
    return DensityResult(
        grid.to(nodes.dtype), density.to(nodes.dtype), nodes, weights, num_matvecs, sigma
    )
