"""torch_secorder: exact second-order quantities of PyTorch losses, and Hessian spectra."""

from torch_secorder._version import __version__
from torch_secorder.core import (
    HessianOperator,
    batched_hvp,
    flatten,
    hessian_block,
    hessian_blocks,
    hessian_diagonal,
    hessian_matrix,
    hvp,
    model_hessian_diagonal,
    model_hessian_matrix,
    model_hvp,
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
    "hessian_block",
    "hessian_blocks",
    "hessian_matrix",
    "model_hessian_matrix",
    # core: linear operator
    "HessianOperator",
    # core: parameter utilities
    "select_params",
    "flatten",
    "unflatten",
]
