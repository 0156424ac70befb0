r"""Hessian-vector products: one vector, many vectors, and the model form.

All products differentiate the gradient a second time (Pearlmutter's trick): with
:math:`g = \nabla_\theta f(\theta)` kept differentiable,
:math:`Hv = \nabla_\theta (g^\top v)`, computed as the vector-Jacobian product of :math:`g`
with cotangent :math:`v`. No Hessian is formed; one product costs about two backward passes.

References:
    Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian. Neural Computation
    6(1), 147-160. https://doi.org/10.1162/neco.1994.6.1.147
"""

import contextlib
from typing import overload

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_bool, check_chunk_size, check_vector
from torch_secorder._types import LossClosure, Params, ParamSelection
from torch_secorder.core._model import Objective, closure_objective, model_objective
from torch_secorder.core.params import flatten

__all__ = ["batched_hvp", "hvp", "model_hvp"]


@overload
def hvp(
    func: LossClosure,
    params: Params,
    v: Tensor,
    *,
    create_graph: bool = ...,
    strict: bool = ...,
) -> Tensor: ...
@overload
def hvp(
    func: LossClosure,
    params: Params,
    v: list[Tensor] | tuple[Tensor, ...],
    *,
    create_graph: bool = ...,
    strict: bool = ...,
) -> list[Tensor]: ...
def hvp(func, params, v, *, create_graph=False, strict=False):
    r"""Multiply the Hessian of a scalar loss with a vector.

    Computes :math:`Hv` with :math:`H = \nabla^2_\theta f(\theta)` by differentiating
    :math:`\nabla_\theta f^\top v` once more (two backward passes, no Hessian is formed).

    Args:
        func: Zero-argument closure returning the scalar loss :math:`f`.
        params: Parameters :math:`\theta` to differentiate with respect to (any iterable).
        v: Vector like ``params`` (a list with one tensor per parameter, same shapes) or a flat
            tensor of length ``P``.
        create_graph: Keep the graph of the result for higher derivatives. (Through
            ``F.layer_norm`` and training-mode ``F.batch_norm``, PyTorch's autograd gets
            third derivatives wrong, pytorch/pytorch#175754 and #186256; second order is right.)
        strict: Raise if the loss does not depend on one of ``params``; otherwise such a
            parameter has zero curvature.

    Returns:
        :math:`Hv` in the structure of ``v``: a list like params, or a flat ``(P,)`` tensor.

    Raises:
        TypeError: If ``func`` is not callable, ``params`` holds a non-tensor, or ``v`` is
            neither a tensor nor a list of tensors.
        ValueError: If ``v`` does not match ``params`` in structure, shape, dtype or device,
            if ``func`` does not return a scalar, or (``strict=True``) if the loss does not
            depend on a parameter.

    Warns:
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing
            (``strict=True`` raises instead).

    Example:
        >>> import torch
        >>> from torch_secorder import hvp
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> hvp(lambda: 0.5 * x @ A @ x, [x], [torch.tensor([1.0, 0.0], dtype=torch.float64)])
        [tensor([2., 1.], dtype=torch.float64)]
    """
    return _hvp(closure_objective("hvp", func, params), v, create_graph, strict)


def _hvp(
    objective: Objective, v: object, create_graph: bool, strict: bool
) -> Tensor | list[Tensor]:
    fname = objective.fname
    check_bool(fname, "create_graph", create_graph)
    check_bool(fname, "strict", strict)
    vectors, flat = check_vector(fname, "v", v, objective.params, objective.names)
    # (a graph of the result is kept also under torch.no_grad(), flattening included)
    with torch.enable_grad() if create_graph else contextlib.nullcontext():
        with objective.gradient(strict=strict) as graph:
            result = graph.vjp(
                vectors, objective.params, create_graph=create_graph, retain_graph=False
            )
        return flatten(result) if flat else result


@overload
def batched_hvp(
    func: LossClosure,
    params: Params,
    vs: Tensor,
    *,
    chunk_size: int | None = ...,
    strict: bool = ...,
) -> Tensor: ...
@overload
def batched_hvp(
    func: LossClosure,
    params: Params,
    vs: list[Tensor] | tuple[Tensor, ...],
    *,
    chunk_size: int | None = ...,
    strict: bool = ...,
) -> list[Tensor]: ...
def batched_hvp(func, params, vs, *, chunk_size=None, strict=False):
    r"""Multiply the Hessian with ``k`` vectors at once, reusing one gradient graph.

    The loss and its differentiable gradient are computed once; the ``k`` products
    :math:`Hv_1, \dots, Hv_k` then run as batched vector-Jacobian products
    (:func:`torch.func.vmap` around :func:`torch.autograd.grad`) in chunks of ``chunk_size``
    vectors, or as a loop where an operator cannot be batched.

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters to differentiate with respect to (any iterable).
        vs: The vectors stacked along a leading dimension ``k``: a list like params where
            ``vs[i]`` has shape ``(k, *params[i].shape)``, or a flat ``(k, P)`` tensor.
        chunk_size: Products per batched call, bounding peak memory; ``1`` runs a loop.
            ``None`` (default) applies a fixed rule of sizes: on the CPU hundreds of small
            products per call, 8 to 32 of medium ones (over 512 KiB each) and larger ones
            (over 1 MiB, or 8 MiB in a graph with a convolution) one at a time; 1024 on GPUs;
            fewer where the estimated intermediates of a chunk would exceed about 1 GiB.
        strict: Raise if the loss does not depend on one of ``params``.

    Returns:
        :math:`[Hv_1, \dots, Hv_k]` stacked like ``vs``: a list of ``(k, *shape)`` tensors or a
        ``(k, P)`` tensor.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``vs`` does not match ``params``, ``chunk_size`` is not positive,
            ``func`` does not return a scalar, or (``strict=True``) the loss does not depend on
            a parameter.

    Warns:
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing
            (``strict=True`` raises instead).

    Example:
        >>> import torch
        >>> from torch_secorder import batched_hvp
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> batched_hvp(lambda: 0.5 * x @ A @ x, [x], torch.eye(2, dtype=torch.float64))
        tensor([[2., 1.],
                [1., 3.]], dtype=torch.float64)
    """
    objective = closure_objective("batched_hvp", func, params)
    fname = objective.fname
    chunk_size = check_chunk_size(fname, chunk_size)
    check_bool(fname, "strict", strict)
    vectors, flat = check_vector(fname, "vs", vs, objective.params, objective.names, batched=True)
    k = vectors[0].shape[0]
    if k == 0:
        result = [p.new_zeros((0, *p.shape)) for p in objective.params]
    else:
        with objective.gradient(strict=strict) as graph:
            result = graph.products(vectors, objective.params, chunk_size=chunk_size)
    return flatten(result, batched=True) if flat else result


@overload
def model_hvp(
    model: nn.Module,
    loss_fn: object,
    inputs: object,
    targets: object,
    v: Tensor,
    *,
    params: ParamSelection = ...,
    create_graph: bool = ...,
    strict: bool = ...,
) -> Tensor: ...
@overload
def model_hvp(
    model: nn.Module,
    loss_fn: object,
    inputs: object,
    targets: object,
    v: list[Tensor] | tuple[Tensor, ...],
    *,
    params: ParamSelection = ...,
    create_graph: bool = ...,
    strict: bool = ...,
) -> list[Tensor]: ...
def model_hvp(model, loss_fn, inputs, targets, v, *, params=None, create_graph=False, strict=False):
    r"""Multiply the Hessian of a model's loss on one batch with a vector.

    The loss is :math:`f(\theta) = \ell(m_\theta(x), y)` with ``loss_fn`` :math:`\ell`; the
    model runs in its current train/eval mode and its buffers (e.g. BatchNorm running
    statistics) are restored afterwards.

    Args:
        model: The model :math:`m_\theta`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: The model's input: a tensor, a tuple of positional arguments (multi-input
            models) or a dict of keyword arguments.
        targets: Passed to ``loss_fn`` unchanged.
        v: Vector like the selected parameters, or flat.
        params: Parameter selection: ``None`` (all with ``requires_grad``), a name, a glob
            pattern, or a list of them (see :func:`select_params`).
        create_graph: Keep the graph of the result for higher derivatives. (Through
            ``F.layer_norm`` and training-mode ``F.batch_norm``, PyTorch's autograd gets
            third derivatives wrong, pytorch/pytorch#175754 and #186256; second order is right.)
        strict: Raise if the loss does not depend on one of the selected parameters.

    Returns:
        :math:`Hv` in the structure of ``v``.

    Raises:
        TypeError: If ``model`` is not a module or an argument has the wrong type.
        ValueError: If the selection matches nothing, ``v`` does not match it, the loss is
            not a scalar, or (``strict=True``) the loss does not depend on a parameter.

    Warns:
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing
            (``strict=True`` raises instead).

    Example:
        >>> import torch
        >>> from torch_secorder import model_hvp
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> loss_fn = torch.nn.MSELoss()  # H = 2/N x^T x = I for these inputs
        >>> model_hvp(model, loss_fn, x, y, torch.tensor([3.0, 4.0], dtype=torch.float64))
        tensor([3., 4.], dtype=torch.float64)
    """
    with model_objective("model_hvp", model, loss_fn, inputs, targets, params) as objective:
        return _hvp(objective, v, create_graph, strict)
