"""Hessian analyses built on products only: trace, extreme eigenpairs, spectral density, diagonal.

Every function accepts a loss closure with its parameters or any symmetric operator with
``matmat``, ``shape``, ``dtype`` and ``device`` (such as :class:`~torch_secorder.HessianOperator`);
the ``model_*`` forms take a model and data and analyse per-layer groups in one run.
"""

from torch_secorder.analysis.density import model_spectral_density, spectral_density
from torch_secorder.analysis.diagonal_estimate import (
    hessian_diagonal_estimate,
    model_hessian_diagonal_estimate,
)
from torch_secorder.analysis.eigen import model_top_eigenvalues, top_eigenvalues
from torch_secorder.analysis.history import CurvatureHistory, CurvatureRecord
from torch_secorder.analysis.monitor import CurvatureMonitor
from torch_secorder.analysis.plot import plot_spectral_density
from torch_secorder.analysis.results import (
    DensityResult,
    DiagonalEstimate,
    EigenResult,
    SharpnessResult,
    TraceEstimate,
)
from torch_secorder.analysis.sharpness import model_sharpness, output_sharpness
from torch_secorder.analysis.trace import hessian_trace, model_hessian_trace

__all__ = [
    # Trace
    "hessian_trace",
    "model_hessian_trace",
    # Extreme eigenpairs
    "top_eigenvalues",
    "model_top_eigenvalues",
    # Spectral density
    "spectral_density",
    "model_spectral_density",
    "plot_spectral_density",
    # Diagonal estimates
    "hessian_diagonal_estimate",
    "model_hessian_diagonal_estimate",
    # Sharpness
    "output_sharpness",
    "model_sharpness",
    # Curvature during training
    "CurvatureMonitor",
    "CurvatureHistory",
    "CurvatureRecord",
    # Result types
    "TraceEstimate",
    "EigenResult",
    "DensityResult",
    "DiagonalEstimate",
    "SharpnessResult",
]
