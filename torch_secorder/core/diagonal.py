r"""The exact Hessian diagonal.

The diagonal of :math:`H_{ii}`, the block of parameter :math:`\theta_i`, is read off products
:math:`H_{ii} e_r` with unit vectors :math:`e_r` of that block, batched in chunks: the
gradient graph is built once, each product differentiates only :math:`g_i` with respect to
:math:`\theta_i`, and the cost is :math:`P` products in :math:`\lceil n_i / c \rceil` calls
per parameter (:math:`c` the chunk size), not one backward pass per element.
"""

from typing import overload

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_bool, check_chunk_size, check_vector
from torch_secorder._types import LossClosure, Params, ParamSelection
from torch_secorder.core._model import Objective, closure_objective, model_objective
from torch_secorder.core.params import flatten

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]


@overload
def hessian_diagonal(
    func: LossClosure,
    params: Params,
    v: None = ...,
    create_graph: bool = ...,
    strict: bool = ...,
    *,
    chunk_size: int | None = ...,
) -> list[Tensor]: ...
@overload
def hessian_diagonal(
    func: LossClosure,
    params: Params,
    v: Tensor,
    create_graph: bool = ...,
    strict: bool = ...,
    *,
    chunk_size: int | None = ...,
) -> Tensor: ...
@overload
def hessian_diagonal(
    func: LossClosure,
    params: Params,
    v: list[Tensor] | tuple[Tensor, ...],
    create_graph: bool = ...,
    strict: bool = ...,
    *,
    chunk_size: int | None = ...,
) -> list[Tensor]: ...
def hessian_diagonal(func, params, v=None, create_graph=False, strict=False, *, chunk_size=None):
    r"""Compute the exact diagonal of the Hessian.

    Returns :math:`\operatorname{diag}(H)` with :math:`H = \nabla^2_\theta f(\theta)`, one
    tensor per parameter. With ``v``, returns the elementwise product
    :math:`v \odot \operatorname{diag}(H)`, i.e. :math:`v_j H_{jj}` (as torch-secorder 0.0.1).

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters to differentiate with respect to (any iterable).
        v: Optional vector like params, or flat, to multiply the diagonal with.
        create_graph: Keep the graph of the result for higher derivatives. (Through
            ``F.layer_norm`` and training-mode ``F.batch_norm``, PyTorch's autograd gets
            third derivatives wrong, pytorch/pytorch#175754 and #186256; second order is right.)
        strict: Raise if the loss does not depend on one of ``params``.
        chunk_size: Unit-vector products per batched call (bounds memory); ``None`` applies
            the fixed rule (32 on CPU, 1024 on GPUs, fewer where memory needs).

    Returns:
        The diagonal as a list like params; with ``v``, :math:`v \odot \operatorname{diag}(H)`
        in the structure of ``v``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``v`` does not match ``params``, ``chunk_size`` is not positive,
            ``func`` does not return a scalar, or (``strict=True``) the loss does not depend on
            a parameter.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hessian_diagonal(lambda: (x**3).sum() + x[0] * x[1], [x])  # diag(6 x)
        [tensor([ 6., 12.], dtype=torch.float64)]
    """
    return _hessian_diagonal(
        closure_objective("hessian_diagonal", func, params), v, create_graph, strict, chunk_size
    )


def _hessian_diagonal(
    objective: Objective,
    v: object,
    create_graph: bool,
    strict: bool,
    chunk_size: int | None,
) -> Tensor | list[Tensor]:
    fname, params = objective.fname, objective.params
    check_bool(fname, "create_graph", create_graph)
    check_bool(fname, "strict", strict)
    check_chunk_size(fname, chunk_size)
    vectors, flat = (None, False)
    if v is not None:
        vectors, flat = check_vector(fname, "v", v, params, objective.names)
    with objective.gradient(strict=strict) as graph:
        diagonal = []
        for i, p in enumerate(params):
            rows = graph.own_block_rows(i, chunk_size=chunk_size, create_graph=create_graph)
            parts = [block.diagonal(offset=start) for start, block in rows]
            diagonal.append(torch.cat(parts).view(p.shape) if parts else torch.zeros_like(p))
    if vectors is None:
        return diagonal
    scaled = [d * u for d, u in zip(diagonal, vectors)]
    return flatten(scaled) if flat else scaled


def model_hessian_diagonal(
    model: nn.Module,
    loss_fn: object,
    inputs: object,
    targets: object,
    create_graph: bool = False,
    strict: bool = False,
    *,
    params: ParamSelection = None,
    chunk_size: int | None = None,
) -> list[Tensor]:
    r"""Compute the exact Hessian diagonal of a model's loss on one batch.

    The loss is :math:`\ell(m_\theta(x), y)`; the model runs in its current mode and its
    buffers are restored afterwards (see :func:`model_hvp`).

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: A tensor, a tuple of positional arguments, or a dict of keyword arguments.
        targets: Passed to ``loss_fn`` unchanged.
        create_graph: Keep the graph of the result for higher derivatives. (Through
            ``F.layer_norm`` and training-mode ``F.batch_norm``, PyTorch's autograd gets
            third derivatives wrong, pytorch/pytorch#175754 and #186256; second order is right.)
        strict: Raise if the loss does not depend on one of the selected parameters.
        params: Parameter selection by names or glob patterns (``None``: all trainable).
        chunk_size: Unit-vector products per batched call.

    Returns:
        The diagonal as a list like the selected parameters.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the selection matches nothing or the loss is not a scalar.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> model_hessian_diagonal(model, torch.nn.MSELoss(), x, y)  # 2/N sum x^2, 2/N N
        [tensor([[10., 20.]], dtype=torch.float64), tensor([2.], dtype=torch.float64)]
    """
    with model_objective(
        "model_hessian_diagonal", model, loss_fn, inputs, targets, params
    ) as objective:
        return _hessian_diagonal(objective, None, create_graph, strict, chunk_size)  # type: ignore[return-value]
