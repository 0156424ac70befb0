"""Exact second-order primitives built on ``torch.autograd.grad`` double backward."""

from torch_secorder.core.blocks import hessian_block, hessian_blocks
from torch_secorder.core.diagonal import DiagonalPlan, LayerPlan, diagonal_plan

# through the module path of the torch-secorder 0.0.1 documentation; the names stay functions
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hvp import batched_hvp, hvp, model_hvp
from torch_secorder.core.matrix import hessian_matrix, model_hessian_matrix
from torch_secorder.core.operator import HessianOperator
from torch_secorder.core.output import (
    model_hessian_dict,
    output_hessian_dict,
    output_hessian_matrix,
)
from torch_secorder.core.params import flatten, select_params, unflatten

__all__ = [
    # Hessian-vector products
    "hvp",
    "batched_hvp",
    "model_hvp",
    # Exact diagonal
    "hessian_diagonal",
    "model_hessian_diagonal",
    "diagonal_plan",
    "DiagonalPlan",
    "LayerPlan",
    # Blocks and matrices
    "hessian_block",
    "hessian_blocks",
    "hessian_matrix",
    "model_hessian_matrix",
    # Output Hessians and named blocks
    "output_hessian_matrix",
    "output_hessian_dict",
    "model_hessian_dict",
    # Linear operator
    "HessianOperator",
    # Parameter utilities
    "select_params",
    "flatten",
    "unflatten",
]
