r"""The Gauss-Newton rule: layers whose path to the model's output is piecewise linear.

If the path from a layer's output :math:`z` to the model's output :math:`f` is piecewise linear
(ReLU, max-pooling, convolutions, linear maps, BatchNorm with running statistics, sums, views,
clamps, selections, permutations, padding, nearest and linear up-sampling), the second
derivative of :math:`f` with respect to :math:`z` vanishes, so the Hessian of the loss with
respect to :math:`z` is exactly the Gauss-Newton term

.. math::
    \frac{\partial^2 L}{\partial z^2} = J^\top H_f J, \qquad J = \frac{\partial f}{\partial z},
    \qquad H_f = \frac{\partial^2 L}{\partial f^2} .

When the samples are independent, :math:`H_f` is block diagonal, one :math:`D \times D` block
:math:`H_n = V_n \Lambda_n V_n^\top` per sample (:math:`D` outputs per sample), read off
:math:`D` products with respect to a probe on :math:`f`; and :math:`J` is block diagonal too,
so one backward pass of :math:`f` with the cotangent :math:`v_{n,c}` (the :math:`c`-th
eigenvector of each sample's block) gives :math:`J_n^\top v_{n,c}` for every sample at once.
A parameter :math:`\theta` entering only through :math:`z`, linearly, then has

.. math::
    \frac{\partial^2 L}{\partial \theta_j^2}
    = \sum_n \sum_c \lambda_{n,c}
      \Big(\frac{\partial (v_{n,c}^\top f_n)}{\partial \theta_j}\Big)^2 ,

a per-sample gradient of each pseudo-output, squared. The cost is :math:`D` products and
:math:`D` backward passes for all such layers together, whatever their size.

Nothing is assumed. :func:`piecewise_linear` walks the autograd graph and admits a layer only
if every operation between its output and :math:`f` is of a kind listed here and, for products
(matrix products, convolutions, elementwise products and quotients), at most one of its
operands depends on the layer's output (a quotient only through its numerator), and if the
loss reaches the layer's output only through :math:`f`. The samples' blocks are checked with
the sets of :mod:`.independence`, exact zeros for every ordered pair of samples: products for
the blocks of :math:`H_f`, backward passes of :math:`f` for the Jacobians (which are not
symmetric, so each direction is checked).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from torch_secorder.core import _chunks
from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._forward import requires_grad
from torch_secorder.core._structured.contraction import CONTRACTION_ELEMENTS
from torch_secorder.core._structured.graph import dependencies, post_order, reached_from
from torch_secorder.core._structured.independence import (
    count,
    inside,
    outside_nonzero,
    random_on,
)
from torch_secorder.core._structured.rules.base import node_name, saved

OUTPUT_BLOCK_BYTES = 2**28
"""Most memory of the per-sample blocks of the output's Hessian (``N D^2`` numbers in float64)
that the rule may hold; larger outputs per sample leave the layers to their own rules."""

_LINEAR = frozenset(
    [
        "Add",
        "Sub",
        "Rsub",
        "Neg",
        "View",
        "UnsafeView",
        "ReshapeAlias",
        "Permute",
        "T",
        "Transpose",
        "Expand",
        "Clone",
        "Cat",
        "Stack",
        "Slice",
        "Select",
        "Squeeze",
        "Unsqueeze",
        "Mean",
        "Sum",
        "AvgPool2D",
        "AvgPool3D",
        "AdaptiveAvgPool2D",
        "AdaptiveAvgPool3D",
        "ToCopy",
        "AsStrided",
        "Split",
        "SplitWithSizes",
        "Unbind",
        "Index",
        "Repeat",
        "Alias",
        "Diagonal",
        "Tril",
        "Triu",
        "Flip",
        "Roll",
        "Cumsum",
        "IndexSelect",
        "Gather",
        "Take",
        "IndexPut",
        "IndexAdd",
        "IndexCopy",
        "Scatter",
        "ScatterAdd",
        "SelectScatter",
        "SliceScatter",
        "MaskedFill",
        "MaskedScatter",
        "Where",
        "Im2Col",
        "Col2Im",
        "Unfold",
        "ConstantPadNd",
        "ReflectionPad1D",
        "ReflectionPad2D",
        "ReflectionPad3D",
        "ReplicationPad1D",
        "ReplicationPad2D",
        "ReplicationPad3D",
        "UpsampleNearest1D",
        "UpsampleNearest2D",
        "UpsampleNearest3D",
        "UpsampleNearestExact1D",
        "UpsampleNearestExact2D",
        "UpsampleNearestExact3D",
        "UpsampleLinear1D",
        "UpsampleBilinear2D",
        "UpsampleTrilinear3D",
        "UpsampleBicubic2D",
        "PixelShuffle",
        "PixelUnshuffle",
        "ChannelShuffle",
        "Relu",
        "Threshold",
        "Hardtanh",
        "LeakyRelu",
        "Abs",
        "Clamp",
        "ClampMin",
        "ClampMax",
        "Maximum",
        "Minimum",
        "Fmax",
        "Fmin",
        "Amax",
        "Amin",
        "Max",
        "Min",
        "Sort",
        "Topk",
        "Kthvalue",
        "Median",
        "MaxPool2DWithIndices",
        "MaxPool3DWithIndices",
        "AdaptiveMaxPool2D",
        "AdaptiveMaxPool3D",
        "MaxUnpool2D",
        "MaxUnpool3D",
    ]
)
"""Operations linear or piecewise linear in all their inputs together (by node name, without
the ``Backward`` suffix): sums, views and copies, selections and permutations, padding,
up-sampling, and the maxima, minima, clamps and sorts of piecewise-linear inputs."""

_NORMS = frozenset(["NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm"])
"""BatchNorm kernels: linear in the input with running statistics, not with batch statistics."""

_PRODUCTS = frozenset(["Mul", "Div", "Mm", "Bmm", "Addmm", "Convolution", "PreluKernel", *_NORMS])
"""Operations linear in each input when the others are fixed: at most one input may depend on
a layer's output (a quotient's divisor none)."""


def piecewise_linear(loss: Tensor, output: Tensor, probes: Sequence[Tensor]) -> list[bool]:
    """For each probe (added to a layer's output), whether the rule holds for its layer.

    That is, whether its path to ``output`` is piecewise linear and the loss reaches it only
    through ``output``.
    """
    index = {id(p): i for i, p in enumerate(probes)}
    admitted = [True] * len(probes)
    for i in reached_from(loss.grad_fn, index, barrier=output.grad_fn):
        admitted[i] = False  # the loss sees the layer past the model's output
    for i in _nonlinear(output.grad_fn, index):
        admitted[i] = False
    return admitted


def _nonlinear(root: object, index: dict[int, int]) -> set[int]:
    """Probes with an operation between them and ``root`` that is not piecewise linear in them."""
    if root is None:
        return set()
    order = post_order(root)
    depends = dependencies(order, index)
    bad: set[int] = set()
    for node in order:
        mine = depends[node]
        if not mine or getattr(node, "variable", None) is not None:
            continue
        name = node_name(node)
        if name in _LINEAR and not (name == "Abs" and _complex_input(node)):
            continue
        if name not in _PRODUCTS or (name in _NORMS and getattr(node, "_saved_training", True)):
            bad |= mine
            continue
        inputs = [depends.get(n, frozenset()) for n, _ in node.next_functions]  # type: ignore[attr-defined]
        for probe in mine:
            divisor = inputs[1] if name == "Div" and len(inputs) > 1 else frozenset()
            if sum(probe in d for d in inputs) > 1 or probe in divisor:
                bad.add(probe)
    return bad


def _complex_input(node: object) -> bool:
    """Whether an ``abs`` takes a complex number's modulus (not piecewise linear), or may."""
    x = saved(node, "self")
    return not isinstance(x, Tensor) or x.is_complex()


def backward(output: Tensor, inputs: Sequence[Tensor], cotangents: Tensor) -> list[Tensor]:
    """Stacked cotangents ``(k, *output.shape)`` pulled back from ``output`` to each input.

    Each result is ``(k, *input.shape)``, zeros where the input does not enter. One backward
    pass per cotangent: on the CPU, :func:`torch.func.vmap` over them took 1.5 to 2 times as
    long on convolutional networks (a CIFAR ResNet-8, a ResNet-18).
    """
    with requires_grad(inputs):
        columns = [
            torch.autograd.grad(output, inputs, cotangent, retain_graph=True, allow_unused=True)
            for cotangent in cotangents
        ]
    if not columns:
        return [x.new_zeros((0, *x.shape)) for x in inputs]
    return [
        torch.stack([torch.zeros_like(x) if g is None else g for g in grads])
        for x, grads in zip(inputs, zip(*columns))
    ]


def jacobian_reached(output: Tensor, probes: Sequence[Tensor]) -> list[bool]:
    """For each probe, whether the output of some sample depends on another sample's probe.

    One backward pass of ``output`` per set of samples, with a cotangent random on the set;
    a probe is reached when its gradient is not exactly zero outside the set.
    """
    sets = inside(output, 0)
    randoms = random_on(sets, output, torch.Generator().manual_seed(0))
    probe_sets = [inside(probe, 0) for probe in probes]
    reached = [False] * len(probes)
    for k in range(len(sets)):  # one pass at a time: each holds gradients like the probes
        grads = backward(output, probes, randoms[k : k + 1])
        for i, (own, grad) in enumerate(zip(probe_sets, grads)):
            reached[i] = reached[i] or outside_nonzero(own[k : k + 1], grad)
    return reached


def output_blocks_fit(probe: Tensor) -> bool:
    """Whether the per-sample blocks of the output's Hessian fit :data:`OUTPUT_BLOCK_BYTES`."""
    samples = probe.shape[0]
    size = probe.numel() // max(1, samples)
    return samples * size * size * 8 <= OUTPUT_BLOCK_BYTES


def diagonals(
    graph: GradientGraph,
    output: Tensor,
    out_index: int,
    layers: Sequence[tuple[Tensor, Tensor | None, int]],
    chunk_size: int | None,
) -> list[tuple[Tensor | None, Tensor]]:
    """The weight and bias diagonals ``(U, F)``, ``(U,)`` of each layer (``None``: no weight).

    Args:
        graph: The gradient graph, with the output's probe at ``out_index``.
        output: The model's output (probe added).
        out_index: Position of the output's probe among the graph's params.
        layers: Per layer, its probe, its features ``(N, *positions, G, F)`` (``None`` when
            only its bias is wanted) and unit axis.
        chunk_size: Products per batched call.

    :math:`D` products give each sample's block :math:`H_n` of the loss's Hessian with respect
    to the output; for each of its eigenvectors one backward pass gives every layer's
    per-sample pseudo-gradients, whose squares, weighted by the eigenvalues, add up to the
    diagonal; the passes' results are held and contracted in chunks as products are.
    """
    probe = graph.params[out_index]
    samples, size = probe.shape[0], probe[0].numel()

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        k = torch.arange(stop - start, device=probe.device)
        units = probe.new_zeros(stop - start, samples, size)
        units[k, :, start + k] = 1
        stacked = units.reshape(stop - start, *probe.shape)
        return [stacked if j == out_index else None for j in range(len(graph.params))]

    chunks = graph.product_chunks(size, cotangents, [probe], chunk_size=chunk_size)
    rows = torch.cat([products for _, _, (products,) in chunks]).reshape(size, samples, size)
    blocks = rows.permute(1, 2, 0).to(torch.float64 if probe.device.type != "mps" else probe.dtype)
    values, vectors = torch.linalg.eigh((blocks + blocks.transpose(1, 2)) / 2)
    values, vectors = values.to(probe.dtype).T, vectors.to(probe.dtype).permute(2, 0, 1)
    sums = [_zeros(layer_probe, features, unit) for layer_probe, features, unit in layers]
    probes = [layer_probe for layer_probe, _, _ in layers]
    step = chunk_size or _chunks.chunk_size(graph, size, probes)
    for start in range(0, size, step):
        part = slice(start, start + step)
        deltas = backward(output, probes, vectors[part].reshape(-1, *probe.shape))
        with torch.no_grad():
            for (_, features, unit), delta, (weight, bias) in zip(layers, deltas, sums):
                _add_pseudo_gradients(features, unit, delta, values[part], weight, bias)
    return sums


def _zeros(probe: Tensor, features: Tensor | None, unit: int) -> tuple[Tensor | None, Tensor]:
    """Zero sums ``(U, F)`` (``None`` without features) and ``(U,)`` for a layer's diagonals."""
    units = probe.shape[unit]
    weight = None if features is None else probe.new_zeros(units, features.shape[-1])
    return weight, probe.new_zeros(units)


def _add_pseudo_gradients(
    features: Tensor | None,
    unit: int,
    delta: Tensor,
    weights: Tensor,
    weight: Tensor | None,
    bias: Tensor,
) -> None:
    r"""Add :math:`\sum_{c,n} w_{cn} g_{cn}^2`, per-sample gradients squared and weighted.

    :math:`g_{cn}` is the gradient of pseudo-output :math:`c` of sample :math:`n` with respect
    to the layer's parameters, from ``delta`` ``(k, *z.shape)``, its gradient with respect to
    the layer's output; ``weights`` is ``(k, N)``.
    """
    count, samples, units = delta.shape[0], delta.shape[1], delta.shape[1 + unit]
    per_unit = delta.movedim(1 + unit, -1).reshape(count, samples, -1, units)
    sums = per_unit.sum(dim=2)  # (k, n, U)
    bias.add_(torch.einsum("kn,knu->u", weights, sums.square()))
    if features is None or weight is None:
        return
    features = features.reshape(samples, -1, *features.shape[-2:])
    groups = features.shape[2]
    per_sample = per_unit.reshape(count, samples, -1, groups, units // groups)
    step = max(1, CONTRACTION_ELEMENTS // max(1, count * units * features.shape[-1]))
    for start in range(0, samples, step):
        part = slice(start, start + step)
        g = torch.einsum("knagv,nagf->kngvf", per_sample[:, part], features[part])
        weight.add_(torch.einsum("kn,knuf->uf", weights[:, part], g.flatten(2, 3).square()))


def cost(samples: int, size: int) -> int:
    """Products and backward passes of the rule: two per output of a sample, two per check."""
    return 2 * (size + count(samples))
