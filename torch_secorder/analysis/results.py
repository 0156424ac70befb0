"""Result types of the analysis functions: small frozen dataclasses of tensors.

Every result reports ``num_matvecs``, the Hessian-vector products the analysis asked of the
operator (a ``k``-column product counts ``k``). Scalars that come from tensors (a trace, its
standard error) are 0-d tensors with the operator's dtype and device; ``float(result.value)``
gives a Python number. A result's ``repr`` is one line, tensors of more than
:data:`SHOWN_ENTRIES` entries shown by shape and dtype; the fields hold them whole.
"""

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

__all__ = ["DensityResult", "DiagonalEstimate", "EigenResult", "SharpnessResult", "TraceEstimate"]

SHOWN_ENTRIES = 10
"""Tensors of at most this many entries appear whole in a result's ``repr``; larger ones by
their shape and dtype (a density's grid, eigenvectors, a diagonal)."""


class _Brief:
    """A ``repr`` of one line: small tensors whole, larger ones by shape and dtype."""

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={_brief(getattr(self, f.name))}" for f in fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}({shown})"


def _brief(value: Any) -> str:
    if isinstance(value, Tensor) and value.numel() > SHOWN_ENTRIES:
        dtype = str(value.dtype).removeprefix("torch.")
        device = "" if value.device.type == "cpu" else f", {value.device}"
        return f"<tensor of shape {tuple(value.shape)}, {dtype}{device}>"
    if isinstance(value, Tensor):
        return " ".join(repr(value).split())
    if isinstance(value, list):
        return "[" + ", ".join(_brief(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True, repr=False)
class TraceEstimate(_Brief):
    """An estimate of the trace of the Hessian.

    Attributes:
        value: The estimate, a 0-d tensor.
        stderr: Its standard error, a 0-d tensor: the sample standard deviation of the
            averaged terms over the square root of their number, the jackknife's for
            ``"xtrace"`` (``0`` for ``method="exact"``, ``nan`` where a single term leaves it
            undefined).
        num_matvecs: Hessian-vector products used.
        method: The method that gave it (``"exact"``, ``"hutch++"``, ``"hutchinson"`` or
            ``"xtrace"``), also when ``method="auto"`` chose it.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_trace
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)
        >>> loss = lambda: 0.5 * (d * x**2).sum()  # H = diag(d)
        >>> result = hessian_trace(loss, [x], method="exact")
        >>> float(result.value), float(result.stderr), result.num_matvecs, result.method
        (8.0, 0.0, 3, 'exact')
    """

    value: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str = "exact"


@dataclass(frozen=True, repr=False)
class EigenResult(_Brief):
    r"""Extreme eigenpairs of the Hessian.

    Attributes:
        eigenvalues: ``(k,)`` tensor, sorted by ``which``: descending for ``"largest"``,
            ascending for ``"smallest"``, by descending magnitude for ``"magnitude"``.
        eigenvectors: Unit eigenvectors in the same order: a list like params, each tensor
            with a leading ``k``, for the closure and model forms; ``(P, k)`` columns for an
            operator.
        residuals: ``(k,)`` tensor of residual norms :math:`\|Hx - \lambda x\|`.
        converged: Whether every pair met the tolerance within the budget.
        num_matvecs: Hessian-vector products used.

    Example:
        >>> import torch
        >>> from torch_secorder import top_eigenvalues
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)
        >>> loss = lambda: 0.5 * (d * x**2).sum()  # H = diag(d)
        >>> result = top_eigenvalues(loss, [x], k=2)
        >>> [round(float(v), 6) for v in result.eigenvalues], result.converged
        ([5.0, 2.0], True)
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | list[Tensor]
    residuals: Tensor
    converged: bool
    num_matvecs: int


@dataclass(frozen=True, repr=False)
class DensityResult(_Brief):
    """A smoothed estimate of the Hessian's eigenvalue density.

    Attributes:
        grid: ``(grid_size,)`` eigenvalue grid, ascending.
        density: ``(grid_size,)`` non-negative density on ``grid``; its trapezoidal integral
            over the grid is 1.
        nodes: ``(num_probes, steps)`` Ritz values of each probe's Lanczos tridiagonal matrix,
            ascending per probe; a probe whose Krylov space was exhausted early is padded in
            front with copies of its first node, of weight zero.
        weights: ``(num_probes, steps)`` Gauss quadrature weights of the nodes; each row sums
            to 1.
        num_matvecs: Hessian-vector products used.
        sigma: Standard deviation of the Gaussian broadening.

    Example:
        >>> import torch
        >>> from torch_secorder import spectral_density
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)
        >>> loss = lambda: 0.5 * (d * x**2).sum()  # H = diag(d)
        >>> result = spectral_density(loss, [x], num_matvecs=3, num_probes=1)
        >>> [round(float(v), 6) for v in result.nodes[0]]  # the Ritz values: H's eigenvalues
        [1.0, 2.0, 5.0]
        >>> round(float(torch.trapezoid(result.density, result.grid)), 6)
        1.0
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    num_matvecs: int
    sigma: float

    def plot(self, ax: Any = None, *, log: bool = False, path: Any = None) -> Any:
        """Plot the density (see :func:`~torch_secorder.analysis.plot_spectral_density`).

        Args:
            ax: Matplotlib ``Axes`` to draw on; ``None`` creates a figure.
            log: Logarithmic density axis.
            path: Save the figure as PNG to this path.

        Returns:
            The ``Axes`` drawn on.

        Raises:
            ImportError: If matplotlib is not installed (the ``plot`` extra).
        """
        from torch_secorder.analysis.plot import plot_spectral_density

        return plot_spectral_density(self, ax, log=log, path=path)


@dataclass(frozen=True, repr=False)
class DiagonalEstimate(_Brief):
    """An estimate of the Hessian's diagonal.

    Attributes:
        diagonal: The estimate: a list like params for the closure and model forms, a flat
            ``(P,)`` tensor for an operator.
        stderr: Per-entry standard errors in the same structure (the jackknife's for
            ``"xdiag"``; zeros for the exact diagonal).
        num_matvecs: Hessian-vector products used.
        method: The method that gave it (``"exact"``, ``"xdiag"`` or ``"hutchinson"``), also
            when ``method="auto"`` chose it.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_diagonal_estimate
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> d = torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)
        >>> loss = lambda: 0.5 * (d * x**2).sum()  # H = diag(d)
        >>> result = hessian_diagonal_estimate(loss, [x], num_matvecs=3)  # 3 products: exact
        >>> result.diagonal, result.method
        ([tensor([1., 5., 2.], dtype=torch.float64)], 'exact')
    """

    diagonal: Tensor | list[Tensor]
    stderr: Tensor | list[Tensor]
    num_matvecs: int
    method: str = "exact"


@dataclass(frozen=True, repr=False)
class SharpnessResult(_Brief):
    r"""The sharpness of the Hessian of every output element of a model.

    Every tensor has the shape of the model's output, ``(b, *out)`` for a batch: entry
    ``[k, o]`` belongs to :math:`H_{k,o}`, the Hessian of output element ``o`` of sample ``k``.

    Attributes:
        sharpness: The largest absolute eigenvalue :math:`\max_i |\lambda_i(H_{k,o})|`.
        eigenvalues: The eigenvalue of largest magnitude, with its sign (``sharpness`` is its
            absolute value).
        residuals: Residual norms :math:`\|H_{k,o} x - \lambda x\|` of its unit eigenvector.
        converged: Bool tensor: whether each met the tolerance within the budget.
        num_matvecs: Hessian-vector products used, all output elements together.
    """

    sharpness: Tensor
    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
