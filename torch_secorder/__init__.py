"""torch_secorder: exact second-order quantities of PyTorch losses, and Hessian spectra."""

from torch_secorder._version import __version__
from torch_secorder.analysis import (
    CurvatureHistory,
    CurvatureMonitor,
    CurvatureRecord,
    DensityResult,
    DiagonalEstimate,
    EigenResult,
    SharpnessResult,
    TraceEstimate,
    hessian_diagonal_estimate,
    hessian_trace,
    model_hessian_diagonal_estimate,
    model_hessian_trace,
    model_sharpness,
    model_spectral_density,
    model_top_eigenvalues,
    output_sharpness,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from torch_secorder.core import (
    DiagonalPlan,
    HessianOperator,
    LayerPlan,
    batched_hvp,
    diagonal_plan,
    flatten,
    hessian_block,
    hessian_blocks,
    hessian_diagonal,
    hessian_matrix,
    hvp,
    model_hessian_diagonal,
    model_hessian_dict,
    model_hessian_matrix,
    model_hvp,
    output_hessian_dict,
    output_hessian_matrix,
    select_params,
    unflatten,
)

__all__ = [
    "__version__",
    # core: Hessian-vector products
    "hvp",
    "batched_hvp",
    "model_hvp",
    # core: exact diagonal, blocks, matrices
    "hessian_diagonal",
    "model_hessian_diagonal",
    "diagonal_plan",
    "DiagonalPlan",
    "LayerPlan",
    "hessian_block",
    "hessian_blocks",
    "hessian_matrix",
    "model_hessian_matrix",
    # core: output Hessians and named blocks (as hesse)
    "output_hessian_matrix",
    "output_hessian_dict",
    "model_hessian_dict",
    # core: linear operator
    "HessianOperator",
    # core: parameter utilities
    "select_params",
    "flatten",
    "unflatten",
    # analysis: trace, eigenpairs, spectral density, diagonal estimates
    "hessian_trace",
    "model_hessian_trace",
    "top_eigenvalues",
    "model_top_eigenvalues",
    "spectral_density",
    "model_spectral_density",
    "plot_spectral_density",
    "hessian_diagonal_estimate",
    "model_hessian_diagonal_estimate",
    # analysis: sharpness (largest absolute eigenvalue)
    "output_sharpness",
    "model_sharpness",
    # analysis: curvature during training
    "CurvatureMonitor",
    "CurvatureHistory",
    "CurvatureRecord",
    # analysis: result types
    "TraceEstimate",
    "EigenResult",
    "DensityResult",
    "DiagonalEstimate",
    "SharpnessResult",
]
