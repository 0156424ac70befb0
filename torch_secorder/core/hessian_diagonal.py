"""The module path of torch-secorder 0.0.1's documentation for the exact Hessian diagonal.

``from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal``
gives the functions of :mod:`torch_secorder.core.diagonal`, where they are defined.
"""

from torch_secorder.core.diagonal import hessian_diagonal, model_hessian_diagonal

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]
