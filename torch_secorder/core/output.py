r"""Hessians of a model's outputs, and Hessians as blocks named by parameter.

For a model :math:`y = m_\theta(x)` whose output has shape ``(b, *out)``, the *output
Hessian* of element :math:`o` of sample :math:`k` is
:math:`H_{k,o} = \nabla^2_\theta\, y_{k,o}(\theta)`, a :math:`P \times P` matrix over the
selected parameters. Every output element of one batch shares one forward pass:

1. the model runs once on the batch (under RNG seed ``0``, as every model form does, on copies
   of its buffers, in the mode it is in);
2. for each of the :math:`M = b\,|out|` output elements, one backward pass with
   ``create_graph=True`` through that forward graph gives its differentiable gradient
   :math:`g_{k,o} = \nabla_\theta y_{k,o}`;
3. products of :math:`g_{k,o}` with unit vectors, :math:`H_{k,o} e_r = \partial (g_{k,o}^\top
   e_r) / \partial\theta`, give the rows of :math:`H_{k,o}`, batched in chunks of the engine's
   rule.

That is :math:`M` gradients and at most :math:`M \cdot P` Hessian-vector products, each a
backward pass through the batch's graph; rows of parameters whose gradient is constant (a last
layer's bias enters every output linearly) are zero and skipped. With ``diagonal_only`` the
count is the same, but each product differentiates only with respect to its own parameter.
Products of different output elements are not stacked into one call: a batched product runs
the backward of every gradient it involves for every vector, so stacking the gradients of
:math:`c` elements (the Jacobian with ``create_graph`` through ``is_grads_batched``, then
products over stacked cotangents) would make each product cost :math:`c` times as much.
``torch.func.hessian`` over :func:`torch.func.functional_call`, as hesse computes these,
does the same :math:`M \cdot P` products' work in forward-over-reverse mode, holding all of
it at once.

The dictionary forms hold the same numbers as ``H["P"]["Q"]``, the block of parameters named
``P`` (rows) and ``Q`` (columns), each shaped ``(*P.shape, *Q.shape)`` after the leading
dimensions of the output.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torch_secorder._checks import (
    check_bool,
    check_chunk_size,
    check_dense_size,
    check_inputs,
    check_layout,
    check_max_bytes,
    format_shape,
    param_label,
)
from torch_secorder._docstrings import shared_arguments
from torch_secorder._types import LossClosure, ParamSelection
from torch_secorder.core import _chunks
from torch_secorder.core._autograd import GradientGraph, unit_cotangents
from torch_secorder.core._forward import forward_context
from torch_secorder.core._model import (
    call_model,
    model_objective,
    model_params,
    operator_locator,
    preserved_state,
    private_buffers,
)
from torch_secorder.core.blocks import DEFAULT_MAX_BYTES

__all__ = ["model_hessian_dict", "output_hessian_dict", "output_hessian_matrix"]

HessianDict = dict[str, dict[str, Tensor]]
"""Blocks by parameter name: ``H["P"]["Q"]``."""

_LAYOUT_HINT = "cast them to one dtype and device."


# ----------------------------------------------------------------------------- model outputs


@dataclass
class ModelOutputs:
    """The outputs of one forward pass of a model, with the graph every element shares.

    Attributes:
        fname: Public function name, for messages.
        names: Names of the selected parameters.
        params: The selected parameters.
        outputs: The model's output, with its graph.
        locate: ``locate(op)`` names the module calling ``op``, for errors about operators
            without a second derivative.
    """

    fname: str
    names: list[str]
    params: list[Tensor]
    outputs: Tensor
    locate: Callable[[str], str | None] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the output: the leading dimensions of every result."""
        return tuple(self.outputs.shape)

    @property
    def numel(self) -> int:
        """Number of output elements :math:`M`."""
        return self.outputs.numel()

    def element(self, index: int) -> LossClosure:
        """A closure returning output element ``index`` (flat, row-major) of the kept pass.

        The element is taken when the closure is called: inside the engine's forward context,
        where gradients are enabled also under :func:`torch.no_grad`.
        """
        return lambda: self.outputs.reshape(-1)[index]

    def objective(self, index: int) -> "ElementObjective":
        """Output element ``index`` as an operator's objective (errors name the module)."""
        return ElementObjective(self, index)

    def gradient(self, index: int) -> GradientGraph:
        """The differentiable gradient of output element ``index``; the forward is not rerun."""
        return GradientGraph(
            self.element(index),
            self.params,
            fname=self.fname,
            names=self.names,
            source="model",
            locate=self.locate,
            constant_warning=False,
        )


@dataclass
class ElementObjective:
    """One output element of a kept forward pass, as an operator's objective."""

    outputs: ModelOutputs
    index: int

    @property
    def fname(self) -> str:
        return self.outputs.fname

    @property
    def params(self) -> list[Tensor]:
        return self.outputs.params

    def gradient(self) -> GradientGraph:
        return self.outputs.gradient(self.index)


def select_outputs(
    fname: str, model: object, inputs: object, params: ParamSelection, batched: object
) -> tuple[list[str], list[Tensor]]:
    """Validate the arguments of an output form; return the selected names and parameters.

    Raises:
        TypeError: If ``model`` is not a module, ``inputs`` not a tensor, tuple, list or dict,
            or ``batched`` not a bool.
        ValueError: If the selection matches nothing or the parameters mix dtypes or devices.
    """
    names, tensors = model_params(fname, model, params)
    check_inputs(fname, "inputs", inputs)
    check_bool(fname, "batched", batched)
    labelled = [(param_label(i, names), p) for i, p in enumerate(tensors)]
    check_layout(fname, "the output Hessians", labelled, _LAYOUT_HINT)
    return names, tensors


@contextlib.contextmanager
def model_outputs(
    fname: str,
    model: nn.Module,
    inputs: object,
    names: list[str],
    params: list[Tensor],
    batched: bool,
) -> Iterator[ModelOutputs]:
    """Run the model once on ``inputs`` and yield its outputs; the model's state is kept.

    The forward pass runs under RNG seed ``0`` (forked: the global RNG is untouched), on copies
    of the buffers, in the model's current mode; modes and buffers are restored on exit.

    Raises:
        TypeError: If the model does not return a tensor.
        ValueError: If the output is not floating point.
    """
    with preserved_state(model):
        with forward_context(params, seed=0), private_buffers(model):
            outputs = call_model(model, inputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"{fname}: model must return a Tensor; got {type(outputs).__name__}. Wrap the "
                "model in a module that returns the one output tensor to differentiate."
            )
        if not outputs.is_floating_point():
            raise ValueError(
                f"{fname}: model returned a {outputs.dtype} output; expected a floating-point "
                "tensor."
            )
        yield ModelOutputs(fname, names, params, outputs, operator_locator(model, inputs))


# ----------------------------------------------------------------------------- row blocks


def _row_chunks(
    graph: GradientGraph, index: int, inputs: list[Tensor], chunk_size: int | None
) -> Iterator[tuple[int, int, list[Tensor]]]:
    r"""Rows ``start:stop`` of parameter ``index``'s rows of :math:`\partial g / \partial x`.

    Yields ``(start, stop, products)``, one ``(stop - start, *x.shape)`` tensor per input
    ``x``; nothing when the parameter's gradient is constant (its rows are zero).
    """
    params = graph.params
    if graph.grads[index] is None:
        return
    offset = sum(p.numel() for p in params[:index])
    yield from graph.product_chunks(
        params[index].numel(),
        lambda start, stop: unit_cotangents(params, offset + start, offset + stop),
        inputs,
        chunk_size=chunk_size,
    )


def _offsets(params: list[Tensor]) -> list[int]:
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return offsets


def _fill_matrix(
    graph: GradientGraph, out: Tensor, diagonal_only: bool, chunk_size: int | None
) -> None:
    """Write the ``(P, P)`` Hessian of ``graph`` (or its diagonal blocks) into ``out``."""
    params = graph.params
    offsets = _offsets(params)
    for i, p in enumerate(params):
        row = offsets[i]
        inputs = [p] if diagonal_only else params
        column = offsets[i] if diagonal_only else 0
        for start, stop, products in _row_chunks(graph, i, inputs, chunk_size):
            rows = torch.cat([r.reshape(stop - start, -1) for r in products], dim=1)
            out[row + start : row + stop, column : column + rows.shape[1]] = rows


def _fill_dict(
    graph: GradientGraph,
    names: list[str],
    blocks: HessianDict,
    index: tuple[int, ...],
    diagonal_only: bool,
    chunk_size: int | None,
) -> None:
    """Write the blocks of ``graph``'s Hessian into ``blocks[a][b][index]``, flat per block."""
    params = graph.params
    for i, name in enumerate(names):
        columns = [i] if diagonal_only else list(range(len(params)))
        inputs = [params[j] for j in columns]
        for start, stop, products in _row_chunks(graph, i, inputs, chunk_size):
            for j, product in zip(columns, products):
                blocks[name][names[j]][(*index, slice(start, stop))] = product.reshape(
                    stop - start, -1
                )


def _empty_blocks(
    names: list[str], params: list[Tensor], lead: tuple[int, ...], diagonal_only: bool
) -> HessianDict:
    """Zero blocks ``(*lead, n_P, n_Q)``, flat per parameter, by name."""
    return {
        a: {
            b: p.new_zeros(*lead, p.numel(), q.numel())
            for b, q in zip(names, params)
            if not diagonal_only or a == b
        }
        for a, p in zip(names, params)
    }


def _shaped_blocks(
    blocks: HessianDict, named: dict[str, Tensor], lead: tuple[int, ...]
) -> HessianDict:
    """View each flat block as ``(*lead, *P.shape, *Q.shape)``."""
    return {
        a: {b: block.view((*lead, *named[a].shape, *named[b].shape)) for b, block in row.items()}
        for a, row in blocks.items()
    }


def _block_entries(params: list[Tensor], diagonal_only: bool) -> int:
    if diagonal_only:
        return sum(p.numel() ** 2 for p in params)
    return sum(p.numel() for p in params) ** 2


def _check_options(
    fname: str, diagonal_only: object, max_bytes: object, chunk_size: object
) -> None:
    check_bool(fname, "diagonal_only", diagonal_only)
    max_bytes = check_max_bytes(fname, max_bytes)
    chunk_size = check_chunk_size(fname, chunk_size)


def element_graphs(
    outputs: ModelOutputs, chunk_size: int | None
) -> Iterator[tuple[int, GradientGraph, int]]:
    """Yield ``(index, graph, chunk_size)`` for every output element, releasing each graph after.

    Without ``chunk_size``, the engine's rule is applied to the first element's graph and its
    chunk size kept for all: every element's gradient graph has the size of the first.
    """
    size = sum(p.numel() for p in outputs.params)
    chunk = chunk_size
    for index in range(outputs.numel):
        with outputs.gradient(index) as graph:
            if chunk is None:
                chunk = _chunks.chunk_size(graph, size, outputs.params)
            yield index, graph, chunk


_OUTPUT_HINT = (
    "use output_sharpness, diagonal_only=True with output_hessian_dict, or a smaller selection "
    "with params=."
)
_BLOCKS_HINT = "use output_sharpness, or a smaller selection with params=."
"""(for the per-parameter blocks of :func:`output_hessian_dict` with ``diagonal_only=True``)"""


# ----------------------------------------------------------------------------- public


@shared_arguments
def output_hessian_matrix(
    model: nn.Module,
    inputs: object,
    *,
    params: ParamSelection = None,
    batched: bool = True,
    diagonal_only: bool = False,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Compute the Hessian of every output element of a model with respect to its parameters.

    For outputs :math:`y = m_\theta(x)` of shape ``(b, *out)``, entry ``[k, o]`` of the result
    is :math:`H_{k,o} = \nabla^2_\theta\, y_{k,o}`, the :math:`P \times P` Hessian of output
    element ``o`` of sample ``k``, parameters in model order, each flattened row-major. The
    model runs once on the batch; each output element costs one gradient and at most
    :math:`P` Hessian-vector products of that one graph, so the result costs
    :math:`b\,|out|` gradients and at most :math:`b\,|out|\,P` products.

    The model runs in the mode it is in (train-mode dropout draws the masks of RNG seed ``0``,
    the masks of every model form), on copies of its buffers; its mode, buffers, parameters,
    ``.grad`` and the global RNG are left as found.

    Args:
        {model_outputs}
        batched: Whether the output's leading dimension indexes samples. The result's leading
            dimensions are the output's shape: ``(b, *out)`` for a batch, ``out`` for one
            sample (``batched=False``), none for a scalar output (either way).
        diagonal_only: Compute only the per-parameter diagonal blocks; the other entries are
            zero.
        max_bytes: Refuse a result needing more memory (default 8 GiB): one output element's
            share before any work, the whole once the forward pass has given the output's
            shape, before any derivative.
        chunk_size: Unit-vector products per batched call; ``None`` applies the engine's rule.

    Returns:
        A ``(*y.shape, P, P)`` tensor with the parameters' dtype and device.

    Raises:
        TypeError: If ``model`` is not a module or returns no tensor, or an argument has the
            wrong type.
        ValueError: If the selection matches nothing, the parameters differ in dtype or
            device, the output is not floating point, or the result would exceed
            ``max_bytes`` (the message gives its size).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(  # y = w2 * w1 * x: H = [[0, x], [x, 0]]
        ...     torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        ... ).double()
        >>> from torch_secorder import output_hessian_matrix
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> H = output_hessian_matrix(model, x)
        >>> H.shape  # (b, *out, P, P)
        torch.Size([2, 1, 2, 2])
        >>> H[1, 0]
        tensor([[0., 2.],
                [2., 0.]], dtype=torch.float64)
    """
    fname = "output_hessian_matrix"
    names, tensors = select_outputs(fname, model, inputs, params, batched)
    _check_options(fname, diagonal_only, max_bytes, chunk_size)
    size = sum(p.numel() for p in tensors)
    dtype = tensors[0].dtype
    one = f"the {size} x {size} Hessian of one output element"
    check_dense_size(fname, one, size * size, dtype, max_bytes, _OUTPUT_HINT)
    with model_outputs(fname, model, inputs, names, tensors, batched) as outputs:
        shape = outputs.shape
        what = f"the result of shape {format_shape((*shape, size, size))}"
        check_dense_size(fname, what, outputs.numel * size * size, dtype, max_bytes, _OUTPUT_HINT)
        result = tensors[0].new_zeros(outputs.numel, size, size)
        for index, graph, chunk in element_graphs(outputs, chunk_size):
            _fill_matrix(graph, result[index], diagonal_only, chunk)
    return result.view(*shape, size, size)


@shared_arguments
def output_hessian_dict(
    model: nn.Module,
    inputs: object,
    *,
    params: ParamSelection = None,
    batched: bool = True,
    diagonal_only: bool = False,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
) -> HessianDict:
    r"""Compute the Hessians of a model's output elements as blocks named by parameter.

    ``H["P"]["Q"][k, o]`` is the block :math:`\partial^2 y_{k,o} / \partial P\,\partial Q` of
    the Hessian of output element ``o`` of sample ``k``, for parameters named ``P`` and ``Q``
    (names of :meth:`~torch.nn.Module.named_parameters`), shaped ``(*P.shape, *Q.shape)``:
    the same numbers as :func:`output_hessian_matrix`, at the same cost. With
    ``diagonal_only``, only the blocks ``H["P"]["P"]`` are computed and present.

    Args:
        {model_outputs}
        batched: Whether the output's leading dimension indexes samples (see
            :func:`output_hessian_matrix`).
        diagonal_only: Compute (and return) only the blocks ``H["P"]["P"]``.
        max_bytes: Refuse blocks needing more memory together (default 8 GiB), as
            :func:`output_hessian_matrix` does.
        chunk_size: Unit-vector products per batched call; ``None`` applies the engine's rule.

    Returns:
        A dict of dicts: ``H[P][Q]`` a ``(*y.shape, *P.shape, *Q.shape)`` tensor, the names
        in model order.

    Raises:
        TypeError: If ``model`` is not a module or returns no tensor, or an argument has the
            wrong type.
        ValueError: If the selection matches nothing, the parameters differ in dtype or
            device, the output is not floating point, or the blocks would exceed
            ``max_bytes`` (the message gives their size).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(  # y = w2 * w1 * x
        ...     torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        ... ).double()
        >>> from torch_secorder import output_hessian_dict
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> H = output_hessian_dict(model, x)
        >>> list(H), list(H["0.weight"])
        (['0.weight', '1.weight'], ['0.weight', '1.weight'])
        >>> H["0.weight"]["1.weight"].shape  # (b, *out, *P.shape, *Q.shape)
        torch.Size([2, 1, 1, 1, 1, 1])
        >>> H["0.weight"]["1.weight"].flatten()  # d2y / dw1 dw2 = x
        tensor([1., 2.], dtype=torch.float64)
    """
    fname = "output_hessian_dict"
    names, tensors = select_outputs(fname, model, inputs, params, batched)
    _check_options(fname, diagonal_only, max_bytes, chunk_size)
    entries = _block_entries(tensors, diagonal_only)
    dtype = tensors[0].dtype
    one = f"the blocks of one output element's Hessian ({entries} entries)"
    hint = _BLOCKS_HINT if diagonal_only else _OUTPUT_HINT
    check_dense_size(fname, one, entries, dtype, max_bytes, hint)
    with model_outputs(fname, model, inputs, names, tensors, batched) as outputs:
        count = outputs.numel
        what = f"the blocks of {count} output elements' Hessians ({count * entries} entries)"
        check_dense_size(fname, what, count * entries, dtype, max_bytes, hint)
        blocks = _empty_blocks(names, tensors, (count,), diagonal_only)
        for index, graph, chunk in element_graphs(outputs, chunk_size):
            _fill_dict(graph, names, blocks, (index,), diagonal_only, chunk)
        shape = outputs.shape
    return _shaped_blocks(blocks, dict(zip(names, tensors)), shape)


def model_hessian_dict(
    model: nn.Module,
    loss_fn: object,
    inputs: object,
    targets: object,
    *,
    params: ParamSelection = None,
    diagonal_only: bool = False,
    max_bytes: float = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
) -> HessianDict:
    r"""Compute the Hessian of a model's loss on one batch as blocks named by parameter.

    ``H["P"]["Q"]`` is the block :math:`\partial^2 \ell / \partial P\,\partial Q` of the loss
    :math:`\ell(m_\theta(x), y)` for parameters named ``P`` and ``Q``, shaped
    ``(*P.shape, *Q.shape)``: the blocks of :func:`~torch_secorder.model_hessian_matrix`. One
    gradient graph serves :math:`P` unit-vector products, batched; with ``diagonal_only``,
    only the blocks ``H["P"]["P"]`` are computed (still :math:`P` products, each
    differentiating only with respect to its own parameter) and present.

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: A tensor, a tuple of positional arguments, or a dict of keyword arguments.
        targets: Passed to ``loss_fn`` unchanged.
        params: Parameter selection by names or glob patterns (``None``: all trainable).
        diagonal_only: Compute (and return) only the blocks ``H["P"]["P"]``.
        max_bytes: Refuse, before any work, blocks needing more memory together (default
            8 GiB).
        chunk_size: Unit-vector products per batched call; ``None`` applies the engine's rule.

    Returns:
        A dict of dicts: ``H[P][Q]`` a ``(*P.shape, *Q.shape)`` tensor, the names in model
        order.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the selection matches nothing, the parameters differ in dtype or
            device, the blocks would exceed ``max_bytes``, or the loss is not a scalar.

    Example:
        >>> import torch
        >>> from torch_secorder import model_hessian_dict
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> H = model_hessian_dict(model, torch.nn.MSELoss(), x, y)
        >>> H["weight"]["weight"]  # 2/N x^T x, shaped (*weight.shape, *weight.shape)
        tensor([[[[10., 14.]],
        <BLANKLINE>
                 [[14., 20.]]]], dtype=torch.float64)
        >>> H["weight"]["bias"], H["bias"]["bias"]
        (tensor([[[4.],
                 [6.]]], dtype=torch.float64), tensor([[2.]], dtype=torch.float64))
    """
    fname = "model_hessian_dict"
    with model_objective(fname, model, loss_fn, inputs, targets, params) as objective:
        tensors, names = objective.params, objective.names
        assert names is not None  # model forms know the names
        _check_options(fname, diagonal_only, max_bytes, chunk_size)
        labelled = [(param_label(i, names), p) for i, p in enumerate(tensors)]
        check_layout(fname, "the Hessian's blocks", labelled, _LAYOUT_HINT)
        entries = _block_entries(tensors, diagonal_only)
        what = f"the blocks of the Hessian ({entries} entries)"
        hint = "use HessianOperator, or a smaller selection with params=."
        if not diagonal_only:
            hint = "use diagonal_only=True, HessianOperator, or a smaller selection with params=."
        check_dense_size(fname, what, entries, tensors[0].dtype, max_bytes, hint)
        blocks = _empty_blocks(names, tensors, (), diagonal_only)
        with objective.gradient() as graph:
            _fill_dict(graph, names, blocks, (), diagonal_only, chunk_size)
    return _shaped_blocks(blocks, dict(zip(names, tensors)), ())
