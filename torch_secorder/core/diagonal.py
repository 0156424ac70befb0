r"""The exact Hessian diagonal, and the plan of how the model form computes it.

The diagonal of :math:`H_{ii}`, the block of parameter :math:`\theta_i`, is read off products
:math:`H_{ii} e_r` with unit vectors :math:`e_r` of that block, batched in chunks: the
gradient graph is built once, each product differentiates only :math:`g_i` with respect to
:math:`\theta_i`, and the cost is :math:`P` products in :math:`\lceil n_i / c \rceil` calls
per parameter (:math:`c` the chunk size), not one backward pass per element. The model form
reads the parameters of ``Linear``, convolution, ``Embedding`` and norm layers off products
with respect to the layers' outputs instead, wherever structural facts of the model and batch
prove that exact and it takes fewer products (:mod:`torch_secorder.core._structured`):
:math:`U` products for a ``Linear`` layer of :math:`U` outputs on independent samples instead
of one per weight. :func:`diagonal_plan` tells, per layer, which path it takes and why.
"""

import contextlib
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_bool, check_chunk_size, check_vector
from torch_secorder._types import LossClosure, Params, ParamSelection
from torch_secorder.core._model import Objective, closure_objective, model_objective
from torch_secorder.core._progress import counted, require_tqdm
from torch_secorder.core._structured import StructuredDiagonal
from torch_secorder.core.params import flatten

__all__ = [
    "DiagonalPlan",
    "LayerPlan",
    "diagonal_plan",
    "hessian_diagonal",
    "model_hessian_diagonal",
]


@overload
def hessian_diagonal(
    func: LossClosure,
    params: Params,
    v: None = ...,
    create_graph: bool = ...,
    strict: bool = ...,
    *,
    chunk_size: int | None = ...,
    progress: bool = ...,
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
    progress: bool = ...,
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
def hessian_diagonal(
    func, params, v=None, create_graph=False, strict=False, *, chunk_size=None, progress=False
):
    r"""Compute the exact diagonal of the Hessian.

    Returns :math:`\operatorname{diag}(H)` with :math:`H = \nabla^2_\theta f(\theta)`, one
    tensor per parameter. With ``v``, returns the elementwise product
    :math:`v \odot \operatorname{diag}(H)`, i.e. :math:`v_j H_{jj}` (as torch-secorder 0.0.1).

    **For a model's loss, prefer** :func:`model_hessian_diagonal` ``(model, loss_fn, inputs,
    targets)``: a closure shows no layers, so this form takes one product per parameter
    element (:math:`P` in all), while the model form reads layers off their outputs, often
    tens to hundreds of times faster (a small CNN: 0.07 s against 5 s).

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters to differentiate with respect to (any iterable).
        v: Optional vector like params, or flat, to multiply the diagonal with.
        create_graph: Keep the graph of the result for higher derivatives. (Through
            ``F.layer_norm`` and training-mode ``F.batch_norm``, PyTorch's autograd gets
            third derivatives wrong, pytorch/pytorch#175754 and #186256; second order is right.)
        strict: Raise if the loss does not depend on one of ``params``.
        chunk_size: Unit-vector products per batched call (bounds memory); ``None`` applies
            the fixed rule (on the CPU: hundreds of small products per call, 8 of medium ones,
            larger ones one at a time; 1024 on GPUs; fewer where memory needs).
        progress: Show a progress bar over the products (needs ``tqdm``).

    Returns:
        The diagonal as a list like params; with ``v``, :math:`v \odot \operatorname{diag}(H)`
        in the structure of ``v``.

    Warns:
        UserWarning: If the diagonal takes over 100,000 products (one per element).
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing
            (``strict=True`` raises instead).

    A closure shows no layers, so this form always takes :math:`P` products, one per
    element. For a model, :func:`model_hessian_diagonal` uses layer structure where it is
    proven exact: :math:`U` products for a ``Linear`` layer of :math:`U` outputs on
    independent samples (64 instead of 4,160 for a 64 x 64 layer with bias), and :math:`2D`
    for all the layers of a piecewise-linear network (a ReLU network in eval mode) with
    :math:`D` outputs per sample; measured speed-ups in ``benchmarks/README.md``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``v`` does not match ``params``, ``chunk_size`` is not positive,
            ``func`` does not return a scalar, or (``strict=True``) the loss does not depend on
            a parameter.
        ImportError: If ``progress=True`` and ``tqdm`` is missing.

    Example:
        >>> import torch
        >>> from torch_secorder import hessian_diagonal
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hessian_diagonal(lambda: (x**3).sum() + x[0] * x[1], [x])  # diag(6 x)
        [tensor([ 6., 12.], dtype=torch.float64)]
    """
    objective = closure_objective("hessian_diagonal", func, params)
    return _hessian_diagonal(objective, v, create_graph, strict, chunk_size, progress)


def _hessian_diagonal(
    objective: Objective,
    v: object,
    create_graph: bool,
    strict: bool,
    chunk_size: int | None,
    progress: bool,
    model: nn.Module | None = None,
) -> Tensor | list[Tensor]:
    fname, params = objective.fname, objective.params
    check_bool(fname, "create_graph", create_graph)
    check_bool(fname, "strict", strict)
    chunk_size = check_chunk_size(fname, chunk_size)
    check_bool(fname, "progress", progress)
    if progress:
        require_tqdm(fname)
    vectors, flat = (None, False)
    if v is not None:
        vectors, flat = check_vector(fname, "v", v, params, objective.names)
    if model is not None and not create_graph:
        with _structured(objective, model, strict, chunk_size) as structured:
            if progress:
                _show(_plan(structured, objective.names))  # type: ignore[arg-type]
            return structured.run(progress)
    with torch.enable_grad() if create_graph else contextlib.nullcontext():  # also under no_grad
        with objective.gradient(strict=strict) as graph:
            products = sum(p.numel() for p, g in zip(params, graph.grads) if g is not None)
            hint = "model_hessian_diagonal uses layer structure where it can, and "
            hint += "hessian_diagonal_estimate estimates the diagonal from far fewer products."
            with counted(graph, fname, products, progress, "exact diagonal", hint):
                diagonal = [
                    graph.own_diagonal(i, chunk_size=chunk_size, create_graph=create_graph)
                    for i in range(len(params))
                ]
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
    progress: bool = False,
) -> list[Tensor]:
    r"""Compute the exact Hessian diagonal of a model's loss on one batch.

    The loss is :math:`\ell(m_\theta(x), y)`; the model runs in its current mode, under RNG
    seed 0 (dropout masks as batch 0 of :meth:`HessianOperator.from_model`), and its
    buffers are left as they were (see :func:`model_hvp`).

    The parameters of ``Linear``, ``Conv1d/2d/3d``, ``Embedding``, BatchNorm, LayerNorm,
    GroupNorm and RMSNorm layers are read off products with respect to each layer's output (a
    zero probe added to it) wherever structural facts of this model and batch prove it exact
    and it takes fewer products than one per element: :math:`U` products for a layer of
    :math:`U` units on independent samples, :math:`T \cdot U` over :math:`T` attending tokens,
    pixels times channels for a convolution, plus a few products that check, for every ordered
    pair of samples (or tokens), that they do not interact. Layers whose path to the model's
    output is piecewise linear (ReLU, pooling, convolutions, BatchNorm with running
    statistics) take :math:`2D` products and backward passes together, :math:`D` outputs per
    sample, by the Gauss-Newton identity exact there. A layer is admitted only if the autograd
    node of its output is its own operation, its parameters reach the loss through that node
    alone, and its output is read nowhere else (a hook, a cache); a layer called more than
    once, a parameter shared or used elsewhere (tied weights, weight decay), and every other
    parameter take one unit-vector product per element. Both paths give the same diagonal to
    rounding; :func:`diagonal_plan` tells which path each layer takes and why, and
    ``docs/algorithms.rst`` states the checks. With ``create_graph=True`` every parameter
    takes the unit-vector path.

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
        chunk_size: Products per batched call.
        progress: Show the plan (as :func:`diagonal_plan`) and a progress bar over the
            products (needs ``tqdm``).

    Returns:
        The diagonal as a list like the selected parameters.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the selection matches nothing, the loss is not a scalar, or
            (``strict=True``) the loss does not depend on a parameter.
        ImportError: If ``progress=True`` and ``tqdm`` is missing.

    Warns:
        UserWarning: If the diagonal takes over 100,000 products.
        RuntimeWarning: If a parameter's gradient passes through a backward that cannot be
            differentiated again (``@once_differentiable``): its curvature is missing
            (``strict=True`` raises instead).

    Example:
        >>> import torch
        >>> from torch_secorder import model_hessian_diagonal
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> model_hessian_diagonal(model, torch.nn.MSELoss(), x, y)  # 2/N sum x^2, 2/N N
        [tensor([[10., 20.]], dtype=torch.float64), tensor([2.], dtype=torch.float64)]
    """
    with model_objective(
        "model_hessian_diagonal", model, loss_fn, inputs, targets, params
    ) as objective:
        return _hessian_diagonal(  # type: ignore[return-value]
            objective, None, create_graph, strict, chunk_size, progress, model
        )


def _structured(
    objective: Objective, model: nn.Module, strict: bool, chunk_size: int | None
) -> StructuredDiagonal:
    return StructuredDiagonal(
        objective.func,
        model,
        objective.params,
        fname=objective.fname,
        names=objective.names,  # type: ignore[arg-type]
        strict=strict,
        seed=objective.seed,
        locate=objective.locate,
        chunk_size=chunk_size,
    )


@dataclass(frozen=True)
class LayerPlan:
    """How :func:`model_hessian_diagonal` computes the diagonal of one module's parameters.

    Attributes:
        module: The module's qualified name (``""`` for the model itself, shown as
            ``"(root)"``).
        parameters: The selected parameters it covers, by name.
        method: ``"layer"`` (the layer's own rule), ``"gauss-newton"`` (the Gauss-Newton
            rule, shared by all the layers that take it), ``"generic"`` (one unit-vector
            product per element) or ``"zero"`` (a curvature proven zero, no product).
        num_matvecs: Hessian-vector products (and backward passes of the Gauss-Newton rule)
            counted for these parameters, checks included.
        reason: What the rule reads, or why the rule was refused.
    """

    module: str
    parameters: tuple[str, ...]
    method: str
    num_matvecs: int
    reason: str


@dataclass(frozen=True)
class DiagonalPlan:
    """The plan of :func:`model_hessian_diagonal` for a model and batch, before the work.

    Attributes:
        layers: One :class:`LayerPlan` per module owning selected parameters, by parameter
            order.
        num_matvecs: Products of the whole diagonal (checks included); with
            :meth:`HessianOperator.diagonal <torch_secorder.HessianOperator.diagonal>` on
            this batch, the operator counts as many.
    """

    layers: tuple[LayerPlan, ...]
    num_matvecs: int

    def __str__(self) -> str:
        width = max((len(layer.module or "(root)") for layer in self.layers), default=5)
        lines = [f"Exact diagonal: {self.num_matvecs} products"]
        for layer in self.layers:
            name = (layer.module or "(root)").ljust(width)
            what = f"{layer.method} ({layer.num_matvecs} products)"
            lines.append(
                f"  {name}  {what}: {layer.reason}" if layer.reason else f"  {name}  {what}"
            )
        return "\n".join(lines)


def diagonal_plan(
    model: nn.Module,
    loss_fn: object,
    inputs: object,
    targets: object,
    *,
    params: ParamSelection = None,
    chunk_size: int | None = None,
) -> DiagonalPlan:
    r"""Tell how :func:`model_hessian_diagonal` will compute the diagonal, before doing it.

    Runs what the model form runs before its products: one forward pass with probes, the
    gradient graph, the structural checks of every layer, and the few products that check
    whether samples and tokens are independent; then returns, per module, the path its
    parameters take (its layer rule, the Gauss-Newton rule, the generic path of one product
    per element, or a zero curvature proven by the graph), its products, and why a rule was
    refused (a layer called twice, an output read by a hook, a weight used elsewhere, a
    rule costing more products, ...). Nothing is left on the model.

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: A tensor, a tuple of positional arguments, or a dict of keyword arguments.
        targets: Passed to ``loss_fn`` unchanged.
        params: Parameter selection by names or glob patterns (``None``: all trainable).
        chunk_size: Products per batched call (as for :func:`model_hessian_diagonal`).

    Returns:
        A :class:`DiagonalPlan`; ``print`` shows it as a table.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the selection matches nothing or the loss is not a scalar.

    Example:
        >>> import torch
        >>> from torch_secorder import diagonal_plan
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        ... ).double()
        >>> x, y = torch.randn(16, 3).double(), torch.randint(0, 2, (16,))
        >>> plan = diagonal_plan(model, torch.nn.CrossEntropyLoss(), x, y)
        >>> [(layer.module, layer.method, layer.num_matvecs) for layer in plan.layers]
        [('0', 'layer', 14), ('2', 'layer', 2)]
    """
    fname = "diagonal_plan"
    chunk_size = check_chunk_size(fname, chunk_size)
    with (
        model_objective(fname, model, loss_fn, inputs, targets, params) as objective,
        _structured(objective, model, False, chunk_size) as structured,
    ):
        return _plan(structured, objective.names)  # type: ignore[arg-type]


def _plan(structured: StructuredDiagonal, names: list[str]) -> DiagonalPlan:
    layers = tuple(
        LayerPlan(
            entry.module,
            tuple(names[i] for i in entry.indices),
            entry.method,
            entry.products,
            entry.reason,
        )
        for entry in structured.entries
    )
    return DiagonalPlan(layers, sum(layer.num_matvecs for layer in layers))


def _show(plan: DiagonalPlan) -> None:
    """Write the plan above the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(str(plan))
