"""Plot a spectral density with matplotlib (an optional dependency, imported lazily)."""

from typing import Any

from torch_secorder.analysis.results import DensityResult

__all__ = ["plot_spectral_density"]


def _matplotlib(fname: str) -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            f"{fname} needs matplotlib; install it with pip install 'torch-secorder[plot]'."
        ) from err
    return matplotlib


def plot_spectral_density(
    result: DensityResult, ax: Any = None, *, log: bool = False, path: Any = None
) -> Any:
    """Plot the eigenvalue density of a :class:`DensityResult`.

    Draws the density over the grid and marks the extreme Ritz nodes. Without ``ax``, a new
    figure is made: with pyplot when ``path`` is ``None`` (so it shows in notebooks), else as a
    standalone :class:`matplotlib.figure.Figure` that is saved and not registered with pyplot.

    Args:
        result: The density, from :func:`spectral_density`.
        ax: Matplotlib ``Axes`` to draw on; ``None`` creates a figure.
        log: Logarithmic density axis (as PyHessian's plots); the density is floored at
            :math:`10^{-12}` times its maximum there.
        path: Save the figure as PNG to this path (a ``str`` or ``os.PathLike``).

    Returns:
        The ``Axes`` drawn on (its figure is ``ax.figure``).

    Raises:
        TypeError: If ``result`` is not a :class:`DensityResult`.
        ImportError: If matplotlib is not installed (the ``plot`` extra).

    Example:
        >>> import os, tempfile, torch
        >>> from torch_secorder import plot_spectral_density
        >>> from torch_secorder import spectral_density
        >>> d = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
        >>> x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> result = spectral_density(lambda: 0.5 * (d * x**2).sum(), [x])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     ax = plot_spectral_density(result, path=os.path.join(folder, "density.png"))
        ...     os.path.getsize(os.path.join(folder, "density.png")) > 0
        True
        >>> ax.get_title()
        'Hessian spectral density (12 products)'
    """
    fname = "plot_spectral_density"
    if not isinstance(result, DensityResult):
        raise TypeError(f"{fname}: result must be a DensityResult; got {type(result).__name__}.")
    _matplotlib(fname)
    if ax is None:
        if path is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        else:
            from matplotlib.figure import Figure

            ax = Figure().add_subplot()
    grid = result.grid.detach().double().cpu().numpy()
    density = result.density.detach().double().cpu()
    if log:
        density = density.clamp_min(1e-12 * float(density.max()))
    ax.plot(grid, density.numpy(), color="C0")
    low, high = float(result.nodes.min()), float(result.nodes.max())
    for edge in (low, high):
        ax.axvline(edge, color="C1", linestyle=":", linewidth=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectral density ({result.num_matvecs} products)")
    if path is not None:
        ax.figure.savefig(path, format="png", dpi=150, bbox_inches="tight")
    return ax
