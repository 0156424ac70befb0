r"""Selected blocks of the Hessian.

A block :math:`H_{RC} = \partial^2 f / \partial\theta_R\,\partial\theta_C` between a row
selection :math:`R` and a column selection :math:`C` is built from products of the gradient
:math:`g_R` with unit vectors of :math:`R`, differentiated with respect to :math:`\theta_C`
(or the transposed way round when :math:`C` is smaller): :math:`\min(P_R, P_C)` products.
"""

from collections.abc import Sequence

from torch import Tensor

from torch_secorder._checks import (
    as_params,
    check_callable,
    check_chunk_size,
    check_dense_size,
    check_layout,
    check_max_bytes,
)
from torch_secorder._types import LossClosure, Params
from torch_secorder.core._autograd import GradientGraph

__all__ = ["hessian_block", "hessian_blocks"]

DEFAULT_MAX_BYTES = 8 * 2**30
"""Default limit on the memory of a dense result: 8 GiB."""

_HINT = "use hvp, batched_hvp or HessianOperator, or a smaller selection."


def hessian_block(
    func: LossClosure,
    row_params: Params,
    col_params: Params | None = None,
    *,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Compute the Hessian block between two parameter selections.

    Returns :math:`H_{RC}` with entries
    :math:`\partial^2 f / \partial(\theta_R)_a\,\partial(\theta_C)_b`, rows and columns in flat
    order (parameters in order, each flattened row-major). The two selections may overlap.

    Args:
        func: Zero-argument closure returning the scalar loss.
        row_params: Parameters :math:`\theta_R` indexing the rows.
        col_params: Parameters :math:`\theta_C` indexing the columns; ``None`` means
            ``row_params`` (the rows' own diagonal block).
        max_bytes: Refuse, before any work, a block needing more memory (default 8 GiB).
        chunk_size: Unit-vector products per batched call; ``None`` applies the fixed rule
            (on the CPU: hundreds of small products per call, 8 of medium ones, larger ones one at
            a time; 1024 on GPUs; fewer where memory needs).

    Returns:
        A ``(P_R, P_C)`` tensor.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a selection is empty, the block would exceed ``max_bytes``, the
            selections differ in dtype or device, or ``func`` does not return a scalar.

    Warns:
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_block
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> y = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
        >>> hessian_block(lambda: (x**2).sum() * y.sum(), [x], [y])  # 2 x
        tensor([[2.],
                [4.]], dtype=torch.float64)
    """
    fname = "hessian_block"
    check_callable(fname, "func", func)
    rows = as_params(fname, row_params, argname="row_params")
    cols = rows if col_params is None else as_params(fname, col_params, argname="col_params")
    max_bytes = check_max_bytes(fname, max_bytes)
    chunk_size = check_chunk_size(fname, chunk_size)
    labelled = [(f"row_params[{i}]", p) for i, p in enumerate(rows)]
    labelled += [(f"col_params[{i}]", p) for i, p in enumerate(cols)]
    check_layout(fname, "a dense block", labelled, "cast them to one dtype and device.")
    num_rows, num_cols = _numel(rows), _numel(cols)
    check_dense_size(
        fname,
        f"the {num_rows} x {num_cols} block",
        num_rows * num_cols,
        rows[0].dtype,
        max_bytes,
        _HINT,
    )
    transpose = num_cols < num_rows
    outer, inner = (cols, rows) if transpose else (rows, cols)
    with GradientGraph(func, outer, fname=fname, extra=inner, route=False) as graph:
        block = graph.dense(inner, chunk_size=chunk_size)
    return block.T.contiguous() if transpose else block


def hessian_blocks(
    func: LossClosure,
    params: Params,
    *,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
) -> list[Tensor]:
    r"""Compute the diagonal block of every parameter (layer-wise curvature).

    Returns :math:`[H_{11}, \dots, H_{mm}]` with
    :math:`H_{ii} = \partial^2 f / \partial\theta_i^2` of shape ``(n_i, n_i)``,
    :math:`n_i` = ``params[i].numel()``, from one gradient graph and :math:`\sum_i n_i`
    products, each differentiating only :math:`g_i`.

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters, one block each.
        max_bytes: Refuse, before any work, blocks needing more memory together.
        chunk_size: Unit-vector products per batched call; ``None`` applies the fixed rule
            (on the CPU: hundreds of small products per call, 8 of medium ones, larger ones one at
            a time; 1024 on GPUs; fewer where memory needs).

    Returns:
        A list of ``(n_i, n_i)`` tensors, one per parameter (a list also for one parameter).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the blocks would exceed ``max_bytes`` or ``func`` does not return a
            scalar.

    Warns:
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_blocks
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> y = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
        >>> hessian_blocks(lambda: x[0] * x[1] * y.sum(), [x, y])
        [tensor([[0., 3.],
                [3., 0.]], dtype=torch.float64), tensor([[0.]], dtype=torch.float64)]
    """
    fname = "hessian_blocks"
    check_callable(fname, "func", func)
    params = as_params(fname, params)
    max_bytes = check_max_bytes(fname, max_bytes)
    chunk_size = check_chunk_size(fname, chunk_size)
    sizes, dtypes = [p.numel() ** 2 for p in params], [p.dtype for p in params]
    check_dense_size(fname, f"a list of {len(params)} blocks", sizes, dtypes, max_bytes, _HINT)
    with GradientGraph(func, params, fname=fname, route=False) as graph:
        blocks = []
        for i, p in enumerate(params):
            block = p.new_zeros(p.numel(), p.numel())
            for start, rows in graph.own_block_rows(i, chunk_size=chunk_size):
                block[start : start + rows.shape[0]] = rows
            blocks.append(block)
    return blocks


def _numel(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in tensors)
