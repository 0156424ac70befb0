r"""The full Hessian matrix.

:math:`H` is assembled row by row from batched products with unit vectors,
:math:`H e_r`, reusing one gradient graph: :math:`P` products in :math:`\lceil P / c \rceil`
calls. A request whose result would not fit in ``max_bytes`` is refused before any work.
"""

from torch import Tensor, nn

from torch_secorder._checks import (
    check_bool,
    check_chunk_size,
    check_dense_size,
    check_layout,
    check_max_bytes,
    param_label,
)
from torch_secorder._types import LossClosure, Params, ParamSelection
from torch_secorder.core._model import Objective, closure_objective, model_objective
from torch_secorder.core._progress import counted, require_tqdm
from torch_secorder.core.blocks import DEFAULT_MAX_BYTES

__all__ = ["hessian_matrix", "model_hessian_matrix"]

_HINT = "use HessianOperator, hessian_blocks or hessian_block instead."
_LAYOUT_HINT = "cast them to one dtype and device, or use hessian_blocks."


def hessian_matrix(
    func: LossClosure,
    params: Params,
    *,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Compute the full Hessian matrix of a scalar loss.

    Returns :math:`H = \nabla^2_\theta f(\theta)` as a :math:`P \times P` matrix, the
    parameters in order, each flattened row-major (as
    :func:`torch.nn.utils.parameters_to_vector`).

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters to differentiate with respect to (any iterable).
        max_bytes: Refuse, before any work, a matrix needing more memory (default 8 GiB).
        chunk_size: Unit-vector products per batched call; ``None`` applies the fixed rule
            (on the CPU: hundreds of small products per call, 8 of medium ones, larger ones one at
            a time; 1024 on GPUs; fewer where memory needs).
        progress: Show a progress bar over the :math:`P` products (needs ``tqdm``).

    Returns:
        A ``(P, P)`` tensor with the params' dtype and device.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the matrix would exceed ``max_bytes`` (the message gives its size), the
            params differ in dtype or device, or ``func`` does not return a scalar.
        ImportError: If ``progress=True`` and ``tqdm`` is missing.

    Warns:
        UserWarning: If the matrix takes over 100,000 products (one per row).
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_matrix
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hessian_matrix(lambda: x[0] ** 2 * x[1], [x])
        tensor([[4., 2.],
                [2., 0.]], dtype=torch.float64)
    """
    objective = closure_objective("hessian_matrix", func, params)
    return _hessian_matrix(objective, max_bytes, chunk_size, progress)


def _hessian_matrix(
    objective: Objective, max_bytes: float, chunk_size: int | None, progress: bool
) -> Tensor:
    fname, params = objective.fname, objective.params
    max_bytes = check_max_bytes(fname, max_bytes)
    chunk_size = check_chunk_size(fname, chunk_size)
    check_bool(fname, "progress", progress)
    if progress:
        require_tqdm(fname)
    labels = [param_label(i, objective.names) for i in range(len(params))]
    check_layout(fname, "a dense Hessian", list(zip(labels, params)), _LAYOUT_HINT)
    size = sum(p.numel() for p in params)
    what = f"the {size} x {size} Hessian"
    check_dense_size(fname, what, size * size, params[0].dtype, max_bytes, _HINT)
    with objective.gradient() as graph:
        hint = "HessianOperator multiplies with it matrix-free."
        with counted(graph, fname, size, progress, "exact Hessian", hint):
            return graph.dense(params, chunk_size=chunk_size)


def model_hessian_matrix(
    model: nn.Module,
    loss_fn: object,
    inputs: object,
    targets: object,
    *,
    params: ParamSelection = None,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Compute the full Hessian of a model's loss on one batch.

    The loss is :math:`\ell(m_\theta(x), y)` with respect to the selected parameters (all
    trainable ones by default); the model runs in its current mode and its buffers are
    restored afterwards.

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: A tensor, a tuple of positional arguments, or a dict of keyword arguments.
        targets: Passed to ``loss_fn`` unchanged.
        params: Parameter selection by names or glob patterns (``None``: all trainable).
        max_bytes: Refuse, before any work, a matrix needing more memory (default 8 GiB).
        chunk_size: Unit-vector products per batched call; ``None`` applies the fixed rule
            (on the CPU: hundreds of small products per call, 8 of medium ones, larger ones one at
            a time; 1024 on GPUs; fewer where memory needs).
        progress: Show a progress bar over the :math:`P` products (needs ``tqdm``).

    Returns:
        A ``(P, P)`` tensor, the selected parameters in model order.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the selection matches nothing, the matrix would exceed ``max_bytes``,
            the parameters differ in dtype or device, or the loss is not a scalar.
        ImportError: If ``progress=True`` and ``tqdm`` is missing.

    Warns:
        UserWarning: If the matrix takes over 100,000 products (one per row).
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing.

    Example:
        >>> import torch
        >>> from torch_secorder import model_hessian_matrix
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> model_hessian_matrix(model, torch.nn.MSELoss(), x, y, params="weight")
        tensor([[10., 14.],
                [14., 20.]], dtype=torch.float64)
    """
    with model_objective(
        "model_hessian_matrix", model, loss_fn, inputs, targets, params
    ) as objective:
        return _hessian_matrix(objective, max_bytes, chunk_size, progress)
