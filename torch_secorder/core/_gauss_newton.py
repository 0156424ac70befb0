r"""The curvature of layer outputs reaching the model's output only through piecewise-linear maps.

If the path from a layer's output :math:`z` to the model's output :math:`f` is piecewise linear
(ReLU, max-pooling, convolutions, linear maps, BatchNorm with running statistics, sums, views),
the second derivative of :math:`f` with respect to :math:`z` vanishes, so the Hessian of the
loss with respect to :math:`z` is exactly the Gauss-Newton term

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

Nothing is assumed: :func:`piecewise_linear` walks the autograd graph and admits a layer only
if every operation between its output and :math:`f` is of a kind listed here and, for products
(matrix products, convolutions, elementwise products and quotients), at most one of its
operands depends on the layer's output (a quotient only through its numerator), and if the
loss reaches the layer's output only through :math:`f`. That the samples' Hessian blocks and
Jacobians are separate is checked in :mod:`._structure`, with random cotangents on half the
samples, products for the Hessian and backward passes (:func:`backward`) for the Jacobians.
"""

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from torch_secorder.core._forward import requires_grad

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
        "AvgPool1D",
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
        "ConstantPadNd",
        "Repeat",
        "Alias",
        "Relu",
        "Threshold",
        "Hardtanh",
        "LeakyRelu",
        "MaxPool2DWithIndices",
        "MaxPool3DWithIndices",
        "AdaptiveMaxPool2D",
        "AdaptiveMaxPool3D",
    ]
)
"""Operations linear or piecewise linear in all their inputs together (by node name, without
the ``Backward`` suffix)."""

_NORMS = frozenset(["NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm"])
"""BatchNorm kernels: linear in the input with running statistics, not with batch statistics."""

_PRODUCTS = frozenset(["Mul", "Div", "Mm", "Bmm", "Addmm", "Convolution", *_NORMS])
"""Operations linear in each input when the others are fixed: at most one input may depend on
a layer's output."""

_NAME = re.compile(r"^(\w+?)Backward\d*$")


def piecewise_linear(loss: Tensor, output: Tensor, probes: Sequence[Tensor]) -> list[bool]:
    """For each probe (added to a layer's output), whether the rule holds for its layer.

    That is, whether its path to ``output`` is piecewise linear and the loss reaches it only
    through ``output``.
    """
    index = {id(p): i for i, p in enumerate(probes)}
    admitted = [True] * len(probes)
    for i in _reached_from(loss.grad_fn, index, barrier=output.grad_fn):
        admitted[i] = False  # the loss sees the layer past the model's output
    for i in _nonlinear(output.grad_fn, index):
        admitted[i] = False
    return admitted


def _post_order(root: object, barrier: object = None) -> list[object]:
    """The nodes of the graph behind ``root``, each after the nodes it uses."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen or node is barrier:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((n, False) for n, _ in node.next_functions if n is not None)  # type: ignore[attr-defined]
    return order


def _dependencies(order: list[object], index: dict[int, int]) -> dict[object, frozenset[int]]:
    """For each node, the probes (by position) it depends on."""
    depends: dict[object, frozenset[int]] = {}
    for node in order:
        variable = getattr(node, "variable", None)
        if variable is not None:
            depends[node] = frozenset({index[id(variable)]} if id(variable) in index else ())
            continue
        inputs = [depends.get(n, frozenset()) for n, _ in node.next_functions]  # type: ignore[attr-defined]
        depends[node] = frozenset().union(*inputs)
    return depends


def _reached_from(root: object, index: dict[int, int], barrier: object) -> frozenset[int]:
    """The probes the graph behind ``root`` reaches without passing ``barrier``."""
    if root is None:
        return frozenset()
    order = _post_order(root, barrier)
    return _dependencies(order, index).get(root, frozenset())


def _nonlinear(root: object, index: dict[int, int]) -> set[int]:
    """Probes with an operation between them and ``root`` that is not piecewise linear in them."""
    if root is None:
        return set()
    order = _post_order(root)
    depends = _dependencies(order, index)
    bad: set[int] = set()
    for node in order:
        mine = depends[node]
        if not mine or getattr(node, "variable", None) is not None:
            continue
        match = _NAME.match(type(node).__name__)
        name = match.group(1) if match else ""
        if name in _LINEAR:
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
    return [
        torch.stack([torch.zeros_like(x) if g is None else g for g in grads])
        for x, grads in zip(inputs, zip(*columns))
    ]
