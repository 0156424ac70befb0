r"""The interface of a layer rule: how a layer's output depends on its parameters.

A rule reads the autograd node that produced a module's output and, where that node is the
layer's own operation, describes the output :math:`z` as linear in the parameters,

.. math:: z_{au} = \sum_f W_{uf} X^{(u)}_{af} + b_u \qquad
    (\text{or } z_{au} = W_{x_a u} \text{ for a lookup}),

with :math:`a` a position (every output axis but the unit axis) and :math:`X^{(u)}` the input as
unit :math:`u` sees it, read off the node's saved tensors (the operation's own arguments, not
the module's attributes). It also returns, for each parameter, the *chain* of graph nodes from
the parameter to the output: the orchestrator admits the layer only if every node of every
chain has exactly one consumer in the loss's graph, the next one, so that the parameters reach
the loss through :math:`z` alone. A rule matches nodes exactly (types, argument slots, scalar
arguments); anything it does not recognise is refused with a reason, and the layer takes the
generic path. Adding a layer type is one module with one :class:`LayerRule` and an entry in
:data:`torch_secorder.core._structured.rules.RULES`.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction

Node = object
"""An autograd graph node (``tensor.grad_fn``)."""


@dataclass(eq=False)
class Layout:
    r"""How a layer's output is linear in its parameters.

    Attributes:
        unit: The output axis of the units :math:`u`.
        features: Computes, when the rule is applied, for an affine layer ``(*axes, G, F)``:
            position :math:`a` over the output's other axes (in order), ``G`` groups of units
            (unit :math:`u` is in group :math:`\lfloor u G / U \rfloor`), ``F`` features per
            unit; for a lookup, the integer indices ``(*axes,)``. ``None`` when the weight
            does not need them (only the bias is selected).
        chains: Per parameter role (``"weight"``, ``"bias"``), the nodes from the parameter's
            ``AccumulateGrad`` to the output's node, in order.
        parameters: Per role, the parameter tensor the chain starts at.
        coupled: Output axes taken as coupled without a check (a convolution's pixels).
        lookup: The weight's rows are looked up by ``features`` (an embedding).
        padding_row: A lookup's row whose gradient is masked (no curvature).
    """

    unit: int
    features: Callable[[], Tensor] | None
    chains: dict[str, list[Node]]
    parameters: dict[str, Tensor]
    coupled: list[int] = field(default_factory=list)
    lookup: bool = False
    padding_row: int | None = None


class LayerRule(Protocol):
    """One layer type's rule."""

    types: tuple[type[nn.Module], ...]
    """Module classes (and their subclasses) the rule applies to."""

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output``, the module's output in the forward pass, or why not."""
        ...


_NAME = re.compile(r"^(\w+?)Backward\d*$")


def node_name(node: Node | None) -> str:
    """A node's operation: ``"Addmm"`` for ``AddmmBackward0``, the class name otherwise.

    A custom :class:`torch.autograd.Function`'s node (``ClampBackward`` for a class ``Clamp``)
    is named ``"Function:"`` and its qualified name, which no operation's name matches: a
    function of the user's is never taken for PyTorch's operation of the same name.
    """
    cls = type(node)
    if issubclass(cls, BackwardCFunction):
        return f"Function:{cls.__qualname__}"
    match = _NAME.match(cls.__name__)
    return match.group(1) if match else cls.__name__


def child(node: Node, slot: int) -> Node | None:
    """The node feeding input ``slot`` of ``node`` (``None`` where it needs no gradient)."""
    inputs = node.next_functions  # type: ignore[attr-defined]
    return inputs[slot][0] if slot < len(inputs) else None


def leaf_chain(
    node: Node,
    slot: int,
    parameter: Tensor | None,
    via: Sequence[str] = (),
    above: Sequence[Node] = (),
) -> list[Node]:
    """The chain from ``parameter`` through ``node`` to the output, entering ``node`` at ``slot``.

    ``via`` names the single-input nodes between the parameter and ``node`` (``["T"]`` for a
    transposed weight); ``above`` lists the nodes from ``node`` up to the output's (views).
    Returns ``[AccumulateGrad, *via nodes, node, *above]``, or ``[]`` when the input is not
    exactly that path to ``parameter``.
    """
    if parameter is None:
        return []
    chain, current = [node], child(node, slot)
    for name in via:
        if current is None or node_name(current) != name or len(current.next_functions) != 1:  # type: ignore[attr-defined]
            return []
        chain.append(current)
        current = child(current, 0)
    if getattr(current, "variable", None) is not parameter:
        return []
    chain.append(current)
    return [*chain[::-1], *above]


def saved(node: Node, name: str) -> object:
    """A node's saved argument ``_saved_<name>``, or ``None`` when it has none."""
    try:
        return getattr(node, f"_saved_{name}")
    except (AttributeError, RuntimeError):  # not saved, or freed
        return None


def own(module: nn.Module, role: str) -> Tensor | None:
    """The module's registered parameter ``role`` (``"weight"``, ``"bias"``), if any."""
    return module._parameters.get(role)


def layout(
    unit: int,
    features: Callable[[], Tensor] | None,
    module: nn.Module,
    chains: dict[str, list[Node]],
    **options: object,
) -> Layout:
    """A layout from the chains found (a parameter without one takes the generic path)."""
    found = {role: chain for role, chain in chains.items() if chain}
    parameters = {role: chain[0].variable for role, chain in found.items()}  # type: ignore[attr-defined]
    return Layout(unit, features, found, parameters, **options)  # type: ignore[arg-type]
